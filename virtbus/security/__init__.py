"""Who may say what on the bus: the call policy, the audit trail, certificates."""
