"""The pool node: a pool of guests served to the controller and, through tunnels, to sensors.

``server.PoolNode`` runs it over any ``service.Pool``; ``controller_link`` keeps it
registered and heartbeating.
"""
