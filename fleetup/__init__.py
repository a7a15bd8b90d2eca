"""`honeyfleet up`: the whole fleet on one machine.

It sits above the roles: it runs each of them as a process (`honeyfleet <role>`),
and builds the pool node's guest image; the base finds it through the
``honeyfleet.commands`` entry point like any other plugin.
"""
