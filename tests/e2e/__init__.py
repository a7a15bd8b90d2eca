"""End-to-end tests with real libvirtd and QEMU guests (see netns_notes.md)."""
