"""The front's view of engine processes: connections, request streams, supervision."""
