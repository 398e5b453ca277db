"""Graph-aware autoscaling: every model server sized from the pipelines' arrivals at
the ingress, in the same tick, through Serve's custom autoscaling policy.

`demand` is the arithmetic (no Ray): calls per request from the graphs, blended with
what requests did; arrival rates; replicas wanted. `board` is the one actor the
ingress replicas report arrivals to. `policy` is the class Serve's controller calls
for each model server (`autoscaling_config.policy`); `settings` its validated options.
"""
