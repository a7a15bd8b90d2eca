"""The sensor: SSH and Telnet frontends that proxy attackers into leased guests.

:class:`sensor.service.Sensor` is the process; :mod:`sensor.ssh` the SSH frontend;
:mod:`sensor.spool` and :mod:`sensor.uploader` carry events to the controller.
"""
