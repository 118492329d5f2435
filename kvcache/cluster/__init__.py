"""The cache cluster: daemons that know each other's blocks and fetch them from each other.

Layout (pure modules import no transport)::

    messages.py   the daemon <-> daemon wire protocol (versioned msgpack, PUB + ROUTER)
    index.py      ClusterIndex: block key -> holder mask over member slots        (pure)
    sync.py       EventLog (publisher) and ClusterView (subscriber) state machines (pure)
    discovery.py  where the peers are: static list, DNS, Kubernetes Endpoints
    base.py       Cluster (what the daemon calls) and NullCluster (cluster off)
    settings.py   ClusterSettings from CacheConfig: node name, address, discovery, keys
    security.py   the security model: bind policy, key allow-lists, names tied to keys, token
    transport.py  the member's sockets (CurveZMQ roles, size limits) and requests to peers
    fetch.py      peer fetch: PeerFetcher (asking) and PeerServer (serving, no promotion)
    metrics.py    shoal_kvcache_cluster_* Prometheus metrics
    node.py       ClusterNode: stream, sync, requests and drain, in the daemon's loop
    admin.py      ClusterAdmin: an operator's client for a remote member (the CLI uses it)
    engine_events.py  vLLM's KV-event stream: payload decoding, seq/replay bookkeeping (pure)
    gpu_prefixes.py   GpuPrefixTracker: vLLM blocks -> Shoal keys on an engine's GPU (pure)
    engine_feed.py    the daemon's SUB/replay sockets to its engines' vLLM publishers

Data flow: the store records block events -> the daemon drains them every loop turn ->
``ClusterNode.publish`` -> peers' ``ClusterView`` -> ``ClusterIndex``; a client's
``locate`` reads the index, its ``fetch`` moves blocks peer -> local store. Engines: vLLM
KV events -> ``engine_feed`` -> ``GpuPrefixTracker`` -> the daemon -> ``ClusterNode``
publishes a ``<node>/gpu<i>`` stream -> peers index it as a member that is never fetched from.
"""
