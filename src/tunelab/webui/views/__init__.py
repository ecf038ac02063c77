"""The Gradio views: one module per tab, each calling the services the JSON API calls too."""
