"""The relay tree coordinator.

Per image the coordinator keeps a tree of nodes (compute hosts holding a
template of the image) whose root is the image's origin, and tells each node
which parent(s) its template fetches missing blocks from. The trees are soft
state: they live in memory and are rebuilt from agent heartbeats after a
restart, while the agents keep reading from their current parents.
"""

# The tree root as a parent reference. '@' never appears in a host name, so
# it cannot collide with a node id.
ORIGIN = '@origin'
