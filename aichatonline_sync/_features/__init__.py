"""Features built on the public client: conversations and notebook display."""
