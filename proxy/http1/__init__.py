"""HTTP/1.1 on llhttp (httptools), both ends of the data path: the server the egress listeners and the
admin API run on (server.py: Request, RequestBody, Response, StreamResponse, Server) and the lean client
the upstream pool uses (client.py: ClientConnection, ClientResponse, ClientBody)."""
