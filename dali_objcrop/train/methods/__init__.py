"""SSL methods: one short file each (pure loss function + small model class)."""
