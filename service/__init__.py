"""Service templates (systemd, launchd, Task Scheduler), shipped as package data."""
