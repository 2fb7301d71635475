"""`tandem bench`: a load generator for Tandem's gRPC API.

Streams requests with the asyncio client under Poisson, gamma or fixed-concurrency arrivals,
measures TTFT, ITL, TPOT and end-to-end latency per request, and reports them beside the
server's own Prometheus counters and histograms (scraped before and after each run).
"""
