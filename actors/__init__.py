"""lockd's actors: connections, lockspaces, leases, owners and the journal, on one dispatcher."""
