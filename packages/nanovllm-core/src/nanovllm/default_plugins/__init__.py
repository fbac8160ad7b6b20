"""Core's own plugins, registered through the hooks like third-party ones (see ``plugins.DEFAULT_PLUGINS``)."""
