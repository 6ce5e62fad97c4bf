"""The famulus daemon: store, job journal, dispatcher, model host and command line."""
