"""Who is on the other end of a connection: tokens, provider keys (JWKS), tickets, refresh."""
