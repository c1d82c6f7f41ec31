"""The timbre map in the browser (`pgesam web`, optional extra `web`: aiohttp).

api.py     what the page can ask of the engine, as plain methods (no HTTP)
server.py  the aiohttp app and a threaded server that routes requests to them
static/    the page: index.html, app.js, style.css (all local, no CDN)
"""
