"""A small MCP server with two calculator tools, for ``examples/mcp_calc/env.yaml``.

Run by the env over stdio (``python server.py``), or as a streamable HTTP server with
``python server.py --port 8765`` (then point the env's ``url`` at http://127.0.0.1:8765/mcp).
"""

import argparse

try:  # the mcp SDK's v2 name, then v1's
    from mcp.server.mcpserver import MCPServer as Server
except ImportError:
    from mcp.server.fastmcp import FastMCP as Server

server = Server("calc")


@server.tool()
def add(a: float, b: float) -> float:
    """Add two numbers."""
    return a + b


@server.tool()
def multiply(a: float, b: float) -> float:
    """Multiply two numbers."""
    return a * b


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, help="serve streamable HTTP on this port instead of stdio")
    args = parser.parse_args()
    if args.port is None:
        server.run()
    else:
        try:
            server.run(transport="streamable-http", host="127.0.0.1", port=args.port)
        except TypeError:  # v1 takes host and port in its settings
            server.settings.host, server.settings.port = "127.0.0.1", args.port
            server.run(transport="streamable-http")
