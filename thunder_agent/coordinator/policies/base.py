"""The interface of tree policies.

A policy decides where a node hangs in the relay tree of an image: when it
joins, and when it lost its parents (a parent failed, left or timed out).
It only reads the tree through the view below; the manager applies the
answer, after checking it (a parent must exist, be able to serve and not be
the node or one of its descendants; anything else falls back to the origin).
"""

import abc


class TreeView(abc.ABC):
    """What a policy may read of one image's tree.

    Node ids are strings; :data:`thunder_agent.coordinator.ORIGIN` stands
    for the root and is a valid parent.
    """

    @abc.abstractmethod
    def nodes(self):
        """Node ids in join order."""

    @abc.abstractmethod
    def parents(self, node):
        """Current parents of *node* (a list, ORIGIN included)."""

    @abc.abstractmethod
    def children(self, node):
        """Children of *node* (or of ORIGIN) in join order."""

    @abc.abstractmethod
    def load(self, node):
        """Children of *node* that count against its fan-out (leaving
        children do not)."""

    @abc.abstractmethod
    def depth(self, node):
        """Hops from the origin (ORIGIN: 0, its children: 1); None while
        an ancestor is unknown (after a coordinator restart)."""

    @abc.abstractmethod
    def descendants(self, node):
        """Set of nodes below *node*."""

    @abc.abstractmethod
    def can_serve(self, node):
        """Whether *node* may take new children (ORIGIN always may)."""


class TreePolicy(abc.ABC):
    """A stevedore plugin in namespace ``thunder_agent.tree_policies``."""

    def __init__(self, fan_out, origin_fan_out=None):
        for value in (fan_out, origin_fan_out):
            if value is None and value is origin_fan_out:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or (
                    value < 1):
                raise ValueError('fan_out and origin_fan_out must be '
                                 'positive integers')
        self.fan_out = fan_out
        # Children the origin serves directly (default: like any node).
        self.origin_fan_out = (fan_out if origin_fan_out is None
                               else origin_fan_out)

    def slots(self, node):
        """How many children *node* may serve."""
        from thunder_agent.coordinator import ORIGIN
        return self.origin_fan_out if node == ORIGIN else self.fan_out

    @abc.abstractmethod
    def choose_parents(self, tree, node):
        """Parents for *node*, which is joining *tree* (not yet in it).

        :returns: a non-empty list of node ids or ORIGIN.
        """

    @abc.abstractmethod
    def choose_new_parents(self, tree, node, lost_parents, grandparents):
        """Parents for *node*, which lost all its parents.

        *lost_parents* are the parents it had (no longer in the tree or no
        longer serving), *grandparents* their own parents, the natural
        first choice as they keep the node's depth.

        :returns: a non-empty list of node ids or ORIGIN, none of them
            *node* or one of its descendants.
        """
