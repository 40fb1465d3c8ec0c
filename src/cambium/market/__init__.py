"""Market data for the screener and the world model: Binance candles and live streams, recorded and replayable.

Imports only `cambium.core`. Submodules (imported explicitly, so that `import cambium.market` stays cheap):
candles/importers/store (MKT-1), binance_rest/downloader (MKT-2), events/binance/limits/connector (MKT-3),
recorder/replay_server (MKT-4), captures (MKT-5). See docs/market.md.
"""
