"""Development tooling of Datamesh Operator (not part of the runtime package or its image)."""
