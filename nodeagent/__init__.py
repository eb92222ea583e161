"""The node agent: keeps its node's JuiceFS cache warm with the models its Bentos will need."""
