/**
 * Public types of the hook catalog: CDS Hooks 2.0 requests, cards, feedback, prefetch.
 */
import type {
  CdsCoding,
  Indicator,
  LinkTemplate,
  SelectionBehavior,
  ActionType,
} from '../rules/index.ts';

export type HookName = 'patient-view' | 'order-select' | 'order-sign';

export interface FhirAuthorization {
  access_token: string;
  token_type: 'Bearer';
  expires_in: number;
  scope: string;
  subject: string;
  patient?: string;
}

/** A validated CDS Hooks 2.0 service request. Unknown top-level fields are tolerated. */
export interface HookRequest {
  hook: HookName;
  hookInstance: string;
  fhirServer?: string;
  fhirAuthorization?: FhirAuthorization;
  context: Record<string, unknown>;
  prefetch?: Record<string, unknown>;
  extension?: Record<string, unknown>;
}

/** A CDS Hooks 2.0 card as sent to the EHR: uuids set, no null/empty optional fields. */
export interface Card {
  uuid: string;
  summary: string;
  detail?: string;
  indicator: Indicator;
  source: { label: string; url?: string; icon?: string; topic?: CdsCoding };
  suggestions?: Array<{
    label: string;
    uuid: string;
    isRecommended?: boolean;
    actions?: Array<{
      type: ActionType;
      description: string;
      resource?: Record<string, unknown>;
      resourceId?: string;
    }>;
  }>;
  selectionBehavior?: SelectionBehavior;
  overrideReasons?: CdsCoding[];
  links?: LinkTemplate[];
}

/** One entry of a `POST /cds-services/{id}/feedback` body. */
export interface FeedbackItem {
  card: string;
  outcome: 'accepted' | 'overridden';
  acceptedSuggestions?: Array<{ id: string }>;
  overrideReason?: { reason?: CdsCoding; userComment?: string };
  outcomeTimestamp: string;
}

/** Limits for fetching missing prefetch from the EHR's FHIR server. */
export interface PrefetchFetchOptions {
  /** Per-request timeout. */
  timeoutMs: number;
  /** Maximum bytes of one response body. */
  maxBytes: number;
  /** Maximum number of searchset pages followed through `next` links (first page included). */
  maxPages: number;
}

/** Observations of the prefetch step, for metrics (no PHI, no tokens). */
export interface PrefetchObserver {
  onFetch?(outcome: 'ok' | 'error' | 'timeout' | 'refused', key: string): void;
}

/**
 * Where a prefetch value came from: `sent` by the EHR, `fetched` from its FHIR server by us, or
 * `not-applicable`: `null`, because a token of the template is not in this call's context (an
 * optional field such as `encounterId` not sent, or a user token for another kind of user).
 */
export type PrefetchSource = 'sent' | 'fetched' | 'not-applicable';

export interface PrefetchResult {
  /** key -> resource or null, exactly the data the rules will see. */
  prefetch: Record<string, unknown>;
  /** Where each key's value came from. */
  sources: Record<string, PrefetchSource>;
}
