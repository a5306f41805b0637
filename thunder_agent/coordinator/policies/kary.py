"""k-ary breadth-first fill under the origin (VMThunder's "volt").

Joiners fill the tree level by level in join order: the first k hang under
the origin, the next k*k under those, and so on, so a tree of H nodes is
about log_k(H) deep and every node serves at most k children.

When a node loses its parent it goes, in that order, under a grandparent
with a free slot (this keeps its depth), under the shallowest node with a
free slot outside its own subtree (often a former sibling), or under the
origin, which is always there.
"""

import collections

from thunder_agent.coordinator import ORIGIN
from thunder_agent.coordinator.policies import base


class KaryBreadthFirst(base.TreePolicy):

    def choose_parents(self, tree, node):
        return [self._shallowest_free(tree, excluded={node})]

    def choose_new_parents(self, tree, node, lost_parents, grandparents):
        excluded = {node} | set(tree.descendants(node)) | set(lost_parents)
        for candidate in grandparents:
            if candidate not in excluded and self._has_slot(tree, candidate):
                return [candidate]
        return [self._shallowest_free(tree, excluded)]

    def _has_slot(self, tree, candidate):
        return tree.can_serve(candidate) and tree.load(candidate) < (
            self.slots(candidate))

    def _shallowest_free(self, tree, excluded):
        # Breadth-first from the origin, children in join order; subtrees
        # of excluded nodes are skipped, so a node never lands below itself.
        queue = collections.deque([ORIGIN])
        seen = {ORIGIN}
        while queue:
            candidate = queue.popleft()
            if self._has_slot(tree, candidate):
                return candidate
            for child in tree.children(candidate):
                if child not in excluded and child not in seen:
                    seen.add(child)
                    queue.append(child)
        # Every reachable node is full or cannot serve: the origin takes one
        # more child rather than leaving the node without a parent.
        return ORIGIN
