/**
 * Public types of the rule-pack engine. These are the contract between rules/ and its callers
 * (hooks/, tenants/, server/). Keep them free of Express and Sequelize.
 */

export type Indicator = 'info' | 'warning' | 'critical';
export type SelectionBehavior = 'at-most-one' | 'any';
export type ActionType = 'create' | 'update' | 'delete';

/** A CDS Hooks Coding (not the FHIR datatype): code and system required. */
export interface CdsCoding {
  system: string;
  code: string;
  display?: string;
}

/** One CDS service a pack offers (what discovery lists). */
export interface PackService {
  id: string;
  hook: string;
  title?: string;
  description: string;
  /** Prefetch templates, key -> relative FHIR URL with CDS Hooks 2.0 tokens only. */
  prefetch?: Record<string, string>;
  usageRequirements?: string;
}

/** A value set carried inline by a pack: membership tests without a terminology server. */
export interface PackValueSet {
  title?: string;
  /** Canonical URL or source link of the published value set this list was taken from. */
  url?: string;
  codes: Array<{ system: string; code: string; display?: string }>;
}

export interface LinkTemplate {
  label: string;
  url: string;
  type: 'absolute' | 'smart';
  appContext?: string;
}

export interface ActionTemplate {
  type: ActionType;
  description: string;
  /** A FHIR resource template; string leaves may contain {{ FHIRPath }} interpolations. */
  resource?: Record<string, unknown>;
  resourceId?: string;
}

export interface SuggestionTemplate {
  label: string;
  isRecommended?: boolean;
  actions?: ActionTemplate[];
}

export interface CardTemplate {
  summary: string;
  detail?: string;
  indicator: Indicator;
  source: { label: string; url?: string; icon?: string; topic?: CdsCoding };
  links?: LinkTemplate[];
  overrideReasons?: CdsCoding[];
  selectionBehavior?: SelectionBehavior;
  suggestions?: SuggestionTemplate[];
}

export interface PackRule {
  id: string;
  /** The id of one of the pack's services. */
  service: string;
  title?: string;
  description?: string;
  /** FHIRPath boolean. Empty or false = the rule does not fire. */
  when: string;
  card: CardTemplate;
}

/** A hook request as the EHR would send it (inline form, used by tests and `pack eval`). */
export interface PackTestRequest {
  hook: string;
  hookInstance?: string;
  context: Record<string, unknown>;
  prefetch?: Record<string, unknown>;
}

export interface PackTest {
  name: string;
  service: string;
  /** Pin %now (ISO 8601 dateTime). Default: the time the test runs. */
  now?: string;
  /** Either an inline request... */
  request?: PackTestRequest;
  /** ...or a request file path relative to the pack file (resolved before upload)... */
  requestFile?: string;
  /** ...or a FHIR patient Bundle file (e.g. Synthea), relative to the pack file, from which
   * context and prefetch are built (see buildRequestFromBundle). */
  patientBundle?: string;
  /** Extra draft orders (FHIR resources) for order-select / order-sign tests built from a bundle. */
  draftOrders?: Array<Record<string, unknown>>;
  /** Rule ids that must fire and must not fire. */
  expect: { fire?: string[]; notFire?: string[] };
}

/** The internal form of a pack, whatever it was authored as (native JSON/YAML or PlanDefinition). */
export interface RulePack {
  id: string;
  version: string;
  title: string;
  publisher: string;
  description: string;
  effectivePeriod?: { start?: string; end?: string };
  services: PackService[];
  valueSets?: Record<string, PackValueSet>;
  let?: Record<string, string>;
  rules: PackRule[];
  tests?: PackTest[];
}

/** One problem found in a pack, with the path of the offending field. */
export interface PackProblem {
  /** e.g. `rules[3].when` */
  path: string;
  /** e.g. `unknown function 'existss' at column 17` */
  message: string;
}

/** Identity of an exact pack content. */
export interface PackRef {
  id: string;
  version: string;
  /** sha256 (hex) of the canonical JSON of the pack. */
  hash: string;
}

/**
 * A validated pack with its FHIRPath compiled. Obtained from `compilePack`; cached by hash.
 * `pack` is the canonical internal form (what is stored and what workers recompile from).
 */
export interface CompiledPack extends PackRef {
  pack: RulePack;
}

/** What a pack is evaluated over, for one hook call. */
export interface EvaluationInput {
  hook: string;
  hookInstance: string;
  context: Record<string, unknown>;
  /** Prefetch key -> FHIR resource (often a searchset Bundle) or null (= no data). */
  prefetch: Record<string, unknown>;
  /** The evaluation instant (%now / %today). */
  now: Date;
}

/** A card as produced by the engine: interpolated, before hooks/ adds uuids and strips empties. */
export interface RawCard {
  ruleId: string;
  summary: string;
  detail?: string;
  indicator: Indicator;
  source: { label: string; url?: string; icon?: string; topic?: CdsCoding };
  links?: LinkTemplate[];
  overrideReasons?: CdsCoding[];
  selectionBehavior?: SelectionBehavior;
  suggestions?: Array<{
    label: string;
    isRecommended?: boolean;
    actions?: Array<{
      type: ActionType;
      description: string;
      resource?: Record<string, unknown>;
      resourceId?: string;
    }>;
  }>;
}

export type TraceStatus = 'fired' | 'not-fired' | 'error' | 'timeout' | 'skipped';

export interface TraceEntry {
  ruleId: string;
  status: TraceStatus;
  fired: boolean;
  durationMs: number;
  /** Safe, PHI-free description of a failure (expression error, budget exceeded, ...). */
  error?: string;
  /**
   * Author tools only (`traceValues`): for a `not-fired` rule whose `when` is a top-level
   * `and`, the first operand (1-based, of `of`) that came out empty or false.
   */
  firstFalse?: { operand: number; of: number; expression: string; result: 'empty' | 'false' };
}

/** One `let` computed during a call; a name appears at most once per call. */
export interface LetTraceEntry {
  name: string;
  status: 'ok' | 'error' | 'timeout';
  durationMs: number;
  /** Safe, PHI-free description of a failure. */
  error?: string;
  /**
   * Author tools only (`traceValues`; never on the live hook path): a summary of the value,
   * e.g. `1 item: MedicationRequest/x http://www.nlm.nih.gov/research/umls/rxnorm|1234`.
   * It shows patient data.
   */
  value?: string;
}

export interface EvaluationResult {
  pack: PackRef;
  service: string;
  cards: RawCard[];
  trace: TraceEntry[];
  durationMs: number;
  /** The `let` values computed for this call (only those the service's rules needed). */
  lets?: LetTraceEntry[];
}

/** A tenant's subscription to a pack; `canary` routes a share of calls to a newer version. */
export interface Subscription {
  pack: string;
  version: string;
  canary?: { version: string; percent: number };
}
