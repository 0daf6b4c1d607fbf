"""The agent's side of the HQ link: login, WebSocket or long-poll transport, reconnect, signed
job verification."""
