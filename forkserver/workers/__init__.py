"""The worker side: receive connections, run the handler, report.

A worker is forked by the master (``forkserver.spawn``) and starts in
``boot.worker_main``: it resets signals, closes every inherited
descriptor but its channel and the standard streams, drops privileges,
arms the parent-death signal, loads the handler and runs one of the
worker classes:

``sync`` (``sync.SyncWorker``)
    one connection at a time, in the main thread.
``thread`` (``thread.ThreadWorker``)
    up to ``concurrency`` connections on a thread pool.
``asyncio`` (``aio.AsyncioWorker``)
    up to ``concurrency`` connections as tasks on one event loop.

Each reports over the supervisor channel (``forkserver.channel``):
READY once loaded, DONE as connections finish, ERROR when the handler
raises (the worker carries on), HEARTBEAT and STATS while its loop runs,
LEAVING when it can receive no more (out of descriptors).  From the
master it takes CONNECTIONS, STOP and REOPEN (the log file, reopened).
"""
