"""lockd's wire protocol: sans-I/O framing, codec, messages and errors, plus a blocking client.

Nothing here touches sockets, files, clocks or threads except ``protocol.client``.
"""
