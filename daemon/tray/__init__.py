"""The tray icon (`famulus tray`): a separate process and a client of the bus.

`state` maps the daemon's status to an icon state, `icons` draws the icons, `actions` contains
the menu actions and `app` runs the pystray icon. Only `app` imports pystray (the `tray`
extra), so the rest imports anywhere.
"""
