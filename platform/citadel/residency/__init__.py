"""Data residency: where each team's data may be processed and stored, enforced by the server.

The model
- A Site is a place with hardware (name, region, jurisdiction, storage path). Worker pools sit
  at a site. A site whose jurisdiction is 'unspecified' (sites made from the old free-text pool
  field, or by naming an unknown site when creating a pool) is allowed only where a policy names it.
- A DataClass is a sensitivity label with a rank: the built-ins public < internal < confidential
  < restricted (seeded by migration), plus custom labels such as phi or pci with a rank.
- A Policy, one per (team, data class), lists the sites and/or jurisdictions where such data may
  be processed and stored, what is kept of prompts (none, metadata, redacted, full; for how many
  days) and whether fine-tuning on it is allowed. A policy with no team covers keys that belong
  to no team. Deny by default: where no policy covers a (team, data class), nothing is allowed.

Who is asking about what data
- An API key belongs to a user, optionally a team, and carries a data class (default internal).
  A request may raise its class with the `X-Citadel-Data-Class` header, never lower it (400).
  A console session counts as its user's one team (none: keys without a team).

Enforcement (services.decide is the one decision)
- Dispatch: /v1 inference goes only to the queues of pools that serve the model and whose site
  the policy allows for processing. When there is none, the request is refused with 403 saying
  which policy allowed what and where the model is deployed; the refusal is audited with the
  decision and nothing is dispatched. Admitted requests carry the decision in their audit record.
- Deployment: a model lists the teams that use it (Model.teams). It may be deployed on a pool
  only if, for every such team and every data class of that team's active keys, the team's
  policy allows processing at the pool's site. The rule looks at declared users rather than
  guessing from past traffic, so an administrator can read off why a deployment was refused;
  teams are declared (PUT /api/v1/models/<name>/teams/) only while existing deployments suit them.
- Storage of prompts: what a job keeps of its prompt once it ends follows the policy's retention
  (residency.prompts; redaction in residency.redaction).
- A dry run (POST /api/v1/residency/dry-run) answers the same decision without dispatching.
- The record of processing activities (GET /api/v1/residency/ropa) is built from policies and
  from the team, data class and site recorded on every inference job.

Not enforced here yet: uploaded files and fine-tuning jobs do not exist in Citadel so far; when
they come, they are to ask `decide(purpose="fine_tuning")` and `storage_sites(policy)`.
"""
