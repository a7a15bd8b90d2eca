#!/bin/sh
# Nightly tarball of web root and configuration.
set -e
dest=/var/backups/$(date +%F)
mkdir -p "$dest"
tar czf "$dest/etc.tgz" /etc 2>/dev/null
tar czf "$dest/www.tgz" /var/www 2>/dev/null
find /var/backups -maxdepth 1 -type d -mtime +14 -exec rm -rf {} +
