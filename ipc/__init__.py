"""The famulus bus: wire protocol, server and client library."""
