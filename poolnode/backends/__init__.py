"""Guest backends: ``libvirt`` (VMs from a base image) and ``static`` (hosts you run)."""
