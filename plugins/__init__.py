"""Built-in famulus plugins and the plugin API."""
