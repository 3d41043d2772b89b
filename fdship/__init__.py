"""fdship: peer-to-peer file distribution with a central scheduler.

Top of the package.  `fdship.core` decides (pure, no I/O), `fdship.center` and
`fdship.daemon` perform, `fdship.protocol` is what crosses the wire.  Importing
`fdship` must stay cheap: it loads neither tornado nor textual.
"""

__version__ = "0.1.0"
