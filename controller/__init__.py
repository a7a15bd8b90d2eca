"""The controller: pool-node registry, lease scheduling, fleet API and enrolment.

``server.Controller`` runs it; ``config.ControllerConfig`` configures it.
"""
