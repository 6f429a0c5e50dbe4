"""``python -m alert_relay``: the relay's server (alert_relay/relay.py)."""

from alert_relay.relay import main

if __name__ == "__main__":
    raise SystemExit(main())
