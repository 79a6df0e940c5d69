"""The browser console: server-rendered Django templates with htmx; no Node build step."""
