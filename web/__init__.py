"""The web dashboard (`cjs dashboard`): an ASGI app (Starlette) over the same app/ functions the
CLI renders. Imported only by the dashboard command, so `cjs --help` stays light."""
