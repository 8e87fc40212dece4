/**
 * The evidence report an auditor asks for, for a period: the region matrix, where every
 * tenant is placed and under which residency policy, key rotation history, admin access and
 * role changes, failed authentication counts, audit chain verification, and the last backup
 * and restore per tenant, who read or replayed which invocation records, and each audit chain's
 * head (an anchor the report's holder keeps: `audit verify --anchor`). JSON (`buildEvidence`)
 * and a readable page
 * (`renderEvidenceMarkdown`). Everything in it comes from PHI-free sources: the control plane
 * and the tenants' audit events (ids, reasons, counts), never records.
 *
 * Sources of events: the control-plane audit log, always; the tenants' own hash-chained audit
 * logs in their data planes (where the data plane records `key.*` and `backup.*` events) when
 * the caller passes `tenantEvents`. The report's `sources` says which were used.
 */
import fs from 'node:fs';
import path from 'node:path';
import { checkFailover, checkPlacement, effectiveResidency } from '../tenants/index.ts';
import type {
  ActiveFailover,
  AuditEvent,
  ControlPlane,
  ResidencyPolicy,
  ResidencyProblem,
  StoredAuditEvent,
  Tenant,
} from '../tenants/index.ts';
import { CONTROL_PLANE_CHAIN, tenantChain } from './audit-anchors.ts';
import { describeRegion } from './regions.ts';
import type { Region, RegionDescription, RegionMatrix } from './regions.ts';

export const EVIDENCE_FORMAT = 'cellcds-evidence/1';
/** `audit.list` returns at most this many events; larger ranges are split. */
const AUDIT_PAGE = 10_000;
/** Record accesses listed one by one; beyond this they are counted only. */
export const MAX_LISTED_RECORD_ACCESSES = 1000;
/** Control-plane events of admin access to invocation records (data-admin.ts). */
const RECORD_ACCESS_TYPES = ['records.read', 'records.replay', 'records.list'] as const;
type RecordAccessType = (typeof RECORD_ACCESS_TYPES)[number];
const isRecordAccess = (type: string): type is RecordAccessType =>
  (RECORD_ACCESS_TYPES as readonly string[]).includes(type);
/** Events of the audit trail's own checks and of evidence runs. */
const AUDIT_CHECK_TYPES = ['audit.verify', 'audit.head', 'evidence.report'];

type Detail = Record<string, string | number | boolean>;

/** One audit event as the report shows it; `source` is `control-plane` or `tenant:<id>`. */
export interface EvidenceEvent {
  at: string;
  type: string;
  outcome: 'success' | 'failure';
  tenant?: string;
  actor?: string;
  detail?: Detail;
  source: string;
}

/** A tenant audit event as the data plane returns it (its tenant is implicit). */
export interface TenantAuditEventLike {
  at: string;
  type: string;
  outcome: AuditEvent['outcome'];
  actor?: string;
  detail?: Detail;
}

/** The result of verifying one tenant's audit chain (tenants/ `ChainVerification`). */
export interface ChainVerificationLike {
  ok: boolean;
  count: number;
  firstBadSeq?: number;
  problem?: string;
}

/** Where a region's keys are held (tenants/ `KeyProvider.describe()`, no key material). */
export interface KeyProviderSummary {
  kind: string;
  location: string;
  primaryKekVersion: number;
  keks: Array<{ version: number; status: string; createdAt: string }>;
}

export interface BuildEvidenceOptions {
  controlPlane: Pick<ControlPlane, 'tenants' | 'audit'>;
  matrix: RegionMatrix;
  /** Period start (inclusive). */
  from: Date | string;
  /** Period end (exclusive). */
  to: Date | string;
  now?: () => Date;
  /**
   * The tenant's own audit events (data plane), all or at least those of the period. Errors
   * are reported in `sources`, not thrown.
   */
  tenantEvents?: (tenant: Tenant) => Promise<readonly TenantAuditEventLike[]>;
  /**
   * Verifies the tenant's audit chain; `null` when the tenant has no store (no chain) in the
   * planes this run can reach. A thrown error becomes a failed result with a safe reason.
   */
  verifyChain?: (tenant: Tenant) => Promise<ChainVerificationLike | null>;
  /** Describes a region's key provider (KEK versions, where keys are held). */
  describeKeys?: (region: Region) => Promise<KeyProviderSummary>;
  /**
   * The tenant's audit chain head (`null`: no store here), listed in `anchors`. A thrown error
   * leaves the tenant out, noted in `sources`.
   */
  chainHead?: (tenant: Tenant) => Promise<ChainHeadLike | null>;
  /** The control-plane audit chain: verified, and its head listed in `anchors`. */
  controlPlaneChain?: {
    verify(): Promise<ChainVerificationLike>;
    head(): Promise<ChainHeadLike>;
  };
  /**
   * Who produces the report (`role:tokenId`). Given, `evidence.report` (with the period) is
   * recorded in the control-plane audit log before anything is read: the run is audited, or no
   * report is made, and the report's control-plane anchor covers its own event.
   */
  actor?: string;
}

/** A chain's head: its last entry's `seq` and `hash`. */
export interface ChainHeadLike {
  seq: number;
  hash: string;
}

/** A chain's head as the report lists it: an anchor to keep. `at`: when it was read. */
export interface EvidenceAnchor extends ChainHeadLike {
  chain: string;
  at: string;
}

/** Admin accesses to invocation records by one actor on one tenant. */
export interface RecordAccessCount {
  tenant: string;
  /** `role:tokenId` as audited. */
  actor: string;
  role: string;
  tokenId: string;
  /** Records decrypted and read (`records.read` succeeded; a replay reads too). */
  read: number;
  /** Replays (`records.replay` succeeded). */
  replay: number;
  /** Listings of invocation summaries (`records.list`). */
  list: number;
  /** Accesses audited as failures (a record not found, not a record id: probes). */
  failed: number;
}

export interface TenantPlacement {
  id: string;
  name: string;
  status: string;
  homeRegion: string;
  /** Jurisdiction of the home region (`unknown` if the matrix lacks it). */
  jurisdiction: string;
  policy: ResidencyPolicy;
  /** `registered`: an explicit policy; `default`: home region only, no DR. */
  policySource: 'registered' | 'default';
  failover: ActiveFailover | null;
  /** What the current matrix says is wrong with this placement (empty: compliant). */
  problems: ResidencyProblem[];
}

export interface ChainCheck extends Partial<ChainVerificationLike> {
  tenant: string;
  region: string;
  /** False when the chain is broken or could not be verified. */
  ok: boolean;
  /** True when the tenant has no store, hence no chain, to verify (not a failure). */
  absent?: boolean;
  /** Why the chain could not be verified (error type only). */
  error?: string;
}

export interface TenantBackups {
  tenant: string;
  /** The last backup in the period, or null. */
  lastBackup: EvidenceEvent | null;
  /** The last restore (or restore test) in the period, or null. */
  lastRestore: EvidenceEvent | null;
}

export interface FailedAuthCounts {
  total: number;
  byReason: Record<string, number>;
}

export interface EvidenceReport {
  format: typeof EVIDENCE_FORMAT;
  generatedAt: string;
  period: { from: string; to: string };
  /** Where the events came from, and anything that could not be read. */
  sources: string[];
  regions: RegionDescription[];
  keyProviders: Array<
    ({ region: string } & KeyProviderSummary) | { region: string; error: string }
  >;
  tenants: TenantPlacement[];
  keyHistory: {
    /** Key lifecycle events (create, rotate, rewrap, destroy, KEK) and `job.*` events. */
    events: EvidenceEvent[];
    /** DEK unwraps are per record read: counted, not listed. */
    unwraps: { success: number; failure: number };
  };
  adminActivity: {
    /** Operator token issue and revoke (with role): who got which access. */
    tokens: EvidenceEvent[];
    /** Other admin actions (tenants, subscriptions, packs). */
    actions: EvidenceEvent[];
    /** Residency decisions: refusals, failovers, home moves. */
    residency: EvidenceEvent[];
    /** Admin accesses refused (403: `admin.forbidden`), by the action refused. */
    forbidden: FailedAuthCounts;
  };
  failedAuth: {
    total: number;
    /** CDS client tokens (`auth.failure`). */
    clients: FailedAuthCounts;
    /** Operator tokens (`admin.auth` failures). */
    operators: FailedAuthCounts;
  };
  /**
   * Admin access to invocation records (control-plane `records.read`, `records.replay`,
   * `records.list`): counts per tenant and actor, and each access up to
   * {@link MAX_LISTED_RECORD_ACCESSES}. `tenantChainReads`: the decrypts the tenants' own chains
   * recorded (`record.read`), per tenant and actor, when their events were read.
   */
  recordAccess: {
    byActor: RecordAccessCount[];
    events: EvidenceEvent[];
    total: number;
    /** Accesses counted but not listed (beyond the listing bound). */
    notListed: number;
    tenantChainReads: Array<{ tenant: string; actor: string; success: number; failure: number }>;
  };
  /** Audit verifications, exported heads and evidence runs (`audit.*`, `evidence.report`). */
  auditActivity: EvidenceEvent[];
  /** Null when no verifier was given. */
  auditChains: { checked: number; failed: number; absent: number; results: ChainCheck[] } | null;
  /** The control-plane chain's verification; null when it was not verified. */
  controlPlaneChain: ChainVerificationLike | null;
  /**
   * Each chain's head when the report was made. Kept with the report (outside the operator's
   * reach), each is an anchor: `cellcds audit verify [--tenant T] --anchor <this JSON>` fails
   * if the chain no longer holds that hash at that `seq` (an event at or before it deleted or
   * edited and the chain recomputed).
   */
  anchors: EvidenceAnchor[];
  backups: TenantBackups[];
}

/** A bad period or option. */
export class EvidenceInputError extends Error {
  constructor(message: string) {
    super(message);
    this.name = new.target.name;
  }
}

function instant(value: Date | string, name: string): Date {
  const d = value instanceof Date ? value : new Date(value);
  if (Number.isNaN(d.getTime())) {
    throw new EvidenceInputError(`${name} must be an ISO 8601 date or instant`);
  }
  return d;
}

/** Every control-plane event of [from, to), splitting the range while a page is full. */
async function listAll(
  audit: ControlPlane['audit'],
  from: Date,
  to: Date,
  notes: string[],
): Promise<StoredAuditEvent[]> {
  const page = await audit.list({ from, to });
  if (page.length < AUDIT_PAGE) {
    return page;
  }
  const mid = new Date(Math.floor((from.getTime() + to.getTime()) / 2));
  if (mid.getTime() <= from.getTime()) {
    notes.push(
      `control-plane audit: more than ${AUDIT_PAGE} events at ${from.toISOString()}; list truncated`,
    );
    return page;
  }
  return [...(await listAll(audit, from, mid, notes)), ...(await listAll(audit, mid, to, notes))];
}

function toEvidence(e: TenantAuditEventLike & { tenant?: string }, source: string): EvidenceEvent {
  return {
    at: e.at,
    type: e.type,
    outcome: e.outcome,
    ...(e.tenant !== undefined ? { tenant: e.tenant } : {}),
    ...(e.actor !== undefined ? { actor: e.actor } : {}),
    ...(e.detail !== undefined ? { detail: { ...e.detail } } : {}),
    source,
  };
}

function safeReason(err: unknown): string {
  if (err instanceof Error) {
    // Error names and codes only: messages of foreign errors may carry anything.
    const code = (err as { code?: unknown }).code;
    return typeof code === 'string' ? `${err.name} (${code})` : err.name;
  }
  return 'error';
}

const isKeyEvent = (type: string) =>
  type.startsWith('key.') || type.startsWith('job.') || type.startsWith('kek.');
const isBackupEvent = (type: string) => type.startsWith('backup.') || type.startsWith('restore.');
const isRestore = (type: string) => type.startsWith('restore.') || type.includes('restore');

function countBy(events: readonly EvidenceEvent[]): FailedAuthCounts {
  const byReason: Record<string, number> = {};
  let total = 0;
  for (const e of events) {
    const reason = typeof e.detail?.reason === 'string' ? e.detail.reason : 'unknown';
    const count =
      e.type.endsWith('.suppressed') && typeof e.detail?.count === 'number' ? e.detail.count : 1;
    byReason[reason] = (byReason[reason] ?? 0) + count;
    total += count;
  }
  const sorted = Object.fromEntries(
    Object.entries(byReason).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0)),
  );
  return { total, byReason: sorted };
}

const byTime = (a: EvidenceEvent, b: EvidenceEvent) => (a.at < b.at ? -1 : a.at > b.at ? 1 : 0);

function placementOf(tenant: Tenant, matrix: RegionMatrix): TenantPlacement {
  const home = matrix.regions.find((r) => r.id === tenant.region);
  const problems = checkPlacement(tenant.residency, tenant.region, matrix.regions);
  if (tenant.failover) {
    problems.push(
      ...checkFailover(tenant, tenant.failover.region, matrix.regions).map((p) => ({
        ...p,
        path: p.path === 'target' ? 'failover.region' : p.path,
      })),
    );
  }
  return {
    id: tenant.id,
    name: tenant.name,
    status: tenant.status,
    homeRegion: tenant.region,
    jurisdiction: home?.jurisdiction ?? 'unknown',
    policy: effectiveResidency(tenant),
    policySource: tenant.residency ? 'registered' : 'default',
    failover: tenant.failover ?? null,
    problems,
  };
}

/**
 * Builds the evidence report for [from, to) from the control plane (and, when given, the
 * tenants' own audit events, chain verifier and key provider descriptions).
 * @throws EvidenceInputError for a bad period; the control plane's errors otherwise.
 */
export async function buildEvidence(opts: BuildEvidenceOptions): Promise<EvidenceReport> {
  const from = instant(opts.from, 'from');
  const to = instant(opts.to, 'to');
  if (from.getTime() >= to.getTime()) {
    throw new EvidenceInputError('from must be before to');
  }
  const now = opts.now ?? (() => new Date());
  if (opts.actor !== undefined) {
    await opts.controlPlane.audit.record({
      type: 'evidence.report',
      outcome: 'success',
      actor: opts.actor,
      detail: { from: from.toISOString(), to: to.toISOString() },
    });
  }
  const sources: string[] = ['control-plane audit log'];
  const tenants = await opts.controlPlane.tenants.list();
  const events: EvidenceEvent[] = (await listAll(opts.controlPlane.audit, from, to, sources)).map(
    (e) => toEvidence(e, CONTROL_PLANE_CHAIN),
  );

  if (opts.tenantEvents) {
    const fromIso = from.toISOString();
    const toIso = to.toISOString();
    let read = 0;
    for (const tenant of tenants) {
      try {
        const list = await opts.tenantEvents(tenant);
        for (const e of list) {
          if (e.at >= fromIso && e.at < toIso) {
            events.push(toEvidence({ ...e, tenant: tenant.id }, tenantChain(tenant.id)));
          }
        }
        read++;
      } catch (err) {
        sources.push(`tenant ${tenant.id} audit chain: not readable (${safeReason(err)})`);
      }
    }
    sources.push(`tenant audit chains (${read} of ${tenants.length} tenants)`);
  } else {
    sources.push(
      'tenant audit chains: not read; key and backup events only as far as the control-plane audit log has them',
    );
  }
  events.sort(byTime);

  const keyEvents = events.filter((e) => isKeyEvent(e.type));
  const unwraps = { success: 0, failure: 0 };
  for (const e of keyEvents) {
    if (e.type === 'key.unwrap') {
      unwraps[e.outcome]++;
    }
  }

  // Beyond the audit budget per second, refusals are audited as counts (`*.suppressed`).
  const clientAuth = events.filter(
    (e) => e.type === 'auth.failure' || e.type === 'auth.failure.suppressed',
  );
  const operatorAuth = events.filter(
    (e) =>
      (e.type === 'admin.auth' && e.outcome === 'failure') || e.type === 'admin.auth.suppressed',
  );
  const clientCounts = countBy(clientAuth);
  const operatorCounts = countBy(operatorAuth);

  let auditChains: EvidenceReport['auditChains'] = null;
  if (opts.verifyChain) {
    const results: ChainCheck[] = [];
    for (const tenant of tenants) {
      try {
        const v = await opts.verifyChain(tenant);
        if (v === null) {
          results.push({ tenant: tenant.id, region: tenant.region, ok: true, absent: true });
          continue;
        }
        results.push({
          tenant: tenant.id,
          region: tenant.region,
          ok: v.ok,
          count: v.count,
          ...(v.firstBadSeq !== undefined ? { firstBadSeq: v.firstBadSeq } : {}),
          ...(v.problem !== undefined ? { problem: v.problem } : {}),
        });
      } catch (err) {
        results.push({
          tenant: tenant.id,
          region: tenant.region,
          ok: false,
          error: safeReason(err),
        });
      }
    }
    auditChains = {
      checked: results.filter((r) => r.absent !== true).length,
      failed: results.filter((r) => !r.ok).length,
      absent: results.filter((r) => r.absent === true).length,
      results,
    };
  }

  let controlPlaneChain: ChainVerificationLike | null = null;
  if (opts.controlPlaneChain) {
    try {
      controlPlaneChain = await opts.controlPlaneChain.verify();
    } catch (err) {
      controlPlaneChain = { ok: false, count: 0, problem: `not verified: ${safeReason(err)}` };
    }
  }

  // Read last, so each head covers the events above (and this run's own `evidence.report`).
  const anchors: EvidenceAnchor[] = [];
  if (opts.controlPlaneChain) {
    try {
      const head = await opts.controlPlaneChain.head();
      anchors.push({
        chain: CONTROL_PLANE_CHAIN,
        seq: head.seq,
        hash: head.hash,
        at: now().toISOString(),
      });
    } catch (err) {
      sources.push(`control-plane audit chain head: not readable (${safeReason(err)})`);
    }
  }
  if (opts.chainHead) {
    for (const tenant of tenants) {
      try {
        const head = await opts.chainHead(tenant);
        if (head !== null) {
          anchors.push({
            chain: tenantChain(tenant.id),
            seq: head.seq,
            hash: head.hash,
            at: now().toISOString(),
          });
        }
      } catch (err) {
        sources.push(`tenant ${tenant.id} audit chain head: not readable (${safeReason(err)})`);
      }
    }
  }

  const keyProviders: EvidenceReport['keyProviders'] = [];
  if (opts.describeKeys) {
    for (const region of opts.matrix.regions) {
      try {
        const d = await opts.describeKeys(region);
        keyProviders.push({
          region: region.id,
          kind: d.kind,
          location: d.location,
          primaryKekVersion: d.primaryKekVersion,
          keks: d.keks.map((k) => ({
            version: k.version,
            status: k.status,
            createdAt: k.createdAt,
          })),
        });
      } catch (err) {
        keyProviders.push({ region: region.id, error: safeReason(err) });
      }
    }
  }

  const backups: TenantBackups[] = tenants.map((t) => {
    const mine = events.filter((e) => e.tenant === t.id && isBackupEvent(e.type));
    const last = (pred: (e: EvidenceEvent) => boolean) => mine.filter(pred).at(-1) ?? null;
    return {
      tenant: t.id,
      lastBackup: last((e) => !isRestore(e.type)),
      lastRestore: last((e) => isRestore(e.type)),
    };
  });

  return {
    format: EVIDENCE_FORMAT,
    generatedAt: now().toISOString(),
    period: { from: from.toISOString(), to: to.toISOString() },
    sources,
    regions: opts.matrix.regions.map(describeRegion),
    keyProviders,
    tenants: tenants.map((t) => placementOf(t, opts.matrix)),
    keyHistory: { events: keyEvents.filter((e) => e.type !== 'key.unwrap'), unwraps },
    adminActivity: {
      tokens: events.filter((e) => e.type.startsWith('admin.token.')),
      actions: events.filter(
        (e) =>
          e.type.startsWith('admin.') &&
          !e.type.startsWith('admin.token.') &&
          e.type !== 'admin.auth' &&
          e.type !== 'admin.auth.suppressed' &&
          e.type !== 'admin.forbidden' &&
          e.type !== 'admin.forbidden.suppressed',
      ),
      residency: events.filter((e) => e.type.startsWith('residency.')),
      forbidden: countBy(
        events.filter(
          (e) => e.type === 'admin.forbidden' || e.type === 'admin.forbidden.suppressed',
        ),
      ),
    },
    failedAuth: {
      total: clientCounts.total + operatorCounts.total,
      clients: clientCounts,
      operators: operatorCounts,
    },
    recordAccess: recordAccessOf(events),
    auditActivity: events.filter(
      (e) => e.source === CONTROL_PLANE_CHAIN && AUDIT_CHECK_TYPES.includes(e.type),
    ),
    auditChains,
    controlPlaneChain,
    anchors,
    backups,
  };
}

/** `role:tokenId` (data-admin.ts `actorOf`) split; anything else is its own token id. */
function actorParts(actor: string): { role: string; tokenId: string } {
  const i = actor.indexOf(':');
  return i > 0
    ? { role: actor.slice(0, i), tokenId: actor.slice(i + 1) }
    : { role: 'unknown', tokenId: actor };
}

const compareKeys = (a: string, b: string) => (a < b ? -1 : a > b ? 1 : 0);

function recordAccessOf(events: readonly EvidenceEvent[]): EvidenceReport['recordAccess'] {
  const accesses = events.filter((e) => e.source === CONTROL_PLANE_CHAIN && isRecordAccess(e.type));
  const counts = new Map<string, RecordAccessCount>();
  const field = { 'records.read': 'read', 'records.replay': 'replay', 'records.list': 'list' };
  for (const e of accesses) {
    const tenant = e.tenant ?? '-';
    const actor = e.actor ?? 'unknown';
    const key = JSON.stringify([tenant, actor]);
    const c = counts.get(key) ?? {
      tenant,
      actor,
      ...actorParts(actor),
      read: 0,
      replay: 0,
      list: 0,
      failed: 0,
    };
    if (e.outcome === 'failure') {
      c.failed += 1;
    } else {
      c[field[e.type as RecordAccessType] as 'read' | 'replay' | 'list'] += 1;
    }
    counts.set(key, c);
  }
  const chainReads = new Map<
    string,
    { tenant: string; actor: string; success: number; failure: number }
  >();
  for (const e of events) {
    if (e.type === 'record.read' && e.source.startsWith('tenant:')) {
      const tenant = e.tenant ?? e.source.slice('tenant:'.length);
      const actor = e.actor ?? '-';
      const key = JSON.stringify([tenant, actor]);
      const c = chainReads.get(key) ?? { tenant, actor, success: 0, failure: 0 };
      c[e.outcome] += 1;
      chainReads.set(key, c);
    }
  }
  const byTenantActor = (
    a: { tenant: string; actor: string },
    b: { tenant: string; actor: string },
  ) => compareKeys(a.tenant, b.tenant) || compareKeys(a.actor, b.actor);
  return {
    byActor: [...counts.values()].sort(byTenantActor),
    events: accesses.slice(0, MAX_LISTED_RECORD_ACCESSES),
    total: accesses.length,
    notListed: Math.max(0, accesses.length - MAX_LISTED_RECORD_ACCESSES),
    tenantChainReads: [...chainReads.values()].sort(byTenantActor),
  };
}

// ------------------------------------------------------------------------------- markdown

function cell(value: unknown): string {
  const text =
    value === undefined || value === null || value === ''
      ? '-'
      : typeof value === 'string'
        ? value
        : JSON.stringify(value);
  return text.replace(/\\/g, '\\\\').replace(/\|/g, '\\|').replace(/\r?\n/g, ' ');
}

function table(header: readonly string[], rows: readonly (readonly unknown[])[]): string[] {
  if (rows.length === 0) {
    return ['_None._', ''];
  }
  return [
    `| ${header.join(' | ')} |`,
    `| ${header.map(() => '---').join(' | ')} |`,
    ...rows.map((r) => `| ${r.map(cell).join(' | ')} |`),
    '',
  ];
}

function detailText(detail: Detail | undefined): string {
  if (!detail) {
    return '-';
  }
  return Object.entries(detail)
    .map(([k, v]) => `${k}=${String(v)}`)
    .join(', ');
}

function eventRows(events: readonly EvidenceEvent[]): unknown[][] {
  return events.map((e) => [e.at, e.tenant, e.type, e.outcome, e.actor, detailText(e.detail)]);
}

const EVENT_HEADER = ['at', 'tenant', 'event', 'outcome', 'actor', 'detail'];

function drText(policy: ResidencyPolicy): string {
  return policy.dr.mode === 'regions' ? `regions: ${policy.dr.regions.join(', ')}` : policy.dr.mode;
}

/** Renders the report as a Markdown page (tables; every value escaped). */
export function renderEvidenceMarkdown(report: EvidenceReport): string {
  const out: string[] = [
    '# cellcds evidence report',
    '',
    `- Period: ${report.period.from} to ${report.period.to} (end exclusive)`,
    `- Generated: ${report.generatedAt}`,
    `- Format: ${report.format}`,
    ...report.sources.map((s) => `- Source: ${s}`),
    '',
    '## Regions',
    '',
    ...table(
      [
        'region',
        'jurisdiction',
        'public URL',
        'data hosted at',
        'backups at',
        'keys held in',
        'failover to',
      ],
      report.regions.map((r) => [
        r.id,
        r.jurisdiction,
        r.publicUrl,
        r.data,
        r.backups,
        r.keys,
        r.failover.join(', '),
      ]),
    ),
  ];
  if (report.keyProviders.length > 0) {
    out.push(
      '## Key providers',
      '',
      ...table(
        ['region', 'kind', 'location', 'primary KEK', 'KEK versions'],
        report.keyProviders.map((k) =>
          'error' in k
            ? [k.region, 'unavailable', k.error, '-', '-']
            : [
                k.region,
                k.kind,
                k.location,
                k.primaryKekVersion,
                k.keks.map((v) => `v${v.version} ${v.status} (${v.createdAt})`).join('; '),
              ],
        ),
      ),
    );
  }
  out.push(
    '## Tenant placements',
    '',
    ...table(
      [
        'tenant',
        'status',
        'home',
        'jurisdiction',
        'processing',
        'backups',
        'DR',
        'policy',
        'failover',
        'problems',
      ],
      report.tenants.map((t) => [
        t.id,
        t.status,
        t.homeRegion,
        t.jurisdiction,
        t.policy.processingRegions.join(', '),
        t.policy.backupRegions.join(', '),
        drText(t.policy),
        t.policySource,
        t.failover
          ? `${t.failover.region} since ${t.failover.declaredAt} by ${t.failover.by}`
          : '-',
        t.problems.length === 0
          ? 'none'
          : t.problems.map((p) => `${p.path}: ${p.message}`).join('; '),
      ]),
    ),
    '## Key rotation history',
    '',
    `DEK unwraps in the period: ${report.keyHistory.unwraps.success} succeeded, ${report.keyHistory.unwraps.failure} failed.`,
    '',
    ...table(EVENT_HEADER, eventRows(report.keyHistory.events)),
    '## Admin access and role changes',
    '',
    '### Operator tokens',
    '',
    ...table(EVENT_HEADER, eventRows(report.adminActivity.tokens)),
    '### Admin actions',
    '',
    ...table(EVENT_HEADER, eventRows(report.adminActivity.actions)),
    '### Residency decisions',
    '',
    ...table(EVENT_HEADER, eventRows(report.adminActivity.residency)),
    '### Refused admin accesses (403)',
    '',
    `Total: ${report.adminActivity.forbidden.total}.`,
    '',
    ...table(
      ['action refused', 'count'],
      Object.entries(report.adminActivity.forbidden.byReason).map(([r, n]) => [r, n]),
    ),
    '## Failed authentication',
    '',
    `Total: ${report.failedAuth.total} (CDS clients ${report.failedAuth.clients.total}, operators ${report.failedAuth.operators.total}).`,
    '',
    ...table(
      ['surface', 'reason', 'count'],
      [
        ...Object.entries(report.failedAuth.clients.byReason).map(([r, n]) => ['CDS client', r, n]),
        ...Object.entries(report.failedAuth.operators.byReason).map(([r, n]) => ['operator', r, n]),
      ],
    ),
    '## Record access',
    '',
    'Invocation records (the patient data of each hook call) read through the admin API: `records.read` (a record decrypted and shown), `records.replay` (a record re-evaluated; it is read too) and `records.list` (summaries listed), from the control-plane audit log. Failed: attempts audited as failures (no such record, not a record id). Attempts refused for lack of the right are counted above, under refused admin accesses (`records:read`).',
    '',
    `Total: ${report.recordAccess.total} access(es).`,
    '',
    ...table(
      ['tenant', 'actor', 'role', 'token id', 'reads', 'replays', 'listings', 'failed'],
      report.recordAccess.byActor.map((c) => [
        c.tenant,
        c.actor,
        c.role,
        c.tokenId,
        c.read,
        c.replay,
        c.list,
        c.failed,
      ]),
    ),
    '### Each access',
    '',
    ...(report.recordAccess.notListed > 0
      ? [
          `The first ${report.recordAccess.events.length} are listed; ${report.recordAccess.notListed} more are counted above only (\`cellcds audit list --type records.read\` lists them).`,
          '',
        ]
      : []),
    ...table(
      ['at', 'tenant', 'event', 'outcome', 'actor', 'invocation', 'detail'],
      report.recordAccess.events.map((e) => [
        e.at,
        e.tenant,
        e.type,
        e.outcome,
        e.actor,
        e.detail?.invocation,
        detailText(e.detail),
      ]),
    ),
    "### Decrypts in the tenants' own audit chains",
    '',
    "Each record the data plane decrypts for a reader is also in the tenant's own chain (`record.read`), with the reader when it was named.",
    '',
    ...table(
      ['tenant', 'actor', 'succeeded', 'failed'],
      report.recordAccess.tenantChainReads.map((r) => [r.tenant, r.actor, r.success, r.failure]),
    ),
    '## Audit chain verification',
    '',
  );
  if (report.controlPlaneChain !== null) {
    const c = report.controlPlaneChain;
    out.push(
      `Control-plane chain: ${c.ok ? 'ok' : 'FAILED'} (${c.count} entries${c.ok ? '' : `; first bad seq ${c.firstBadSeq ?? '-'}, ${c.problem ?? 'unknown'}`}).`,
      '',
    );
  }
  if (report.auditChains === null) {
    out.push('_Not verified in this run._', '');
  } else {
    out.push(
      `${report.auditChains.checked} chain(s) checked, ${report.auditChains.failed} failed, ${report.auditChains.absent} tenant(s) without a store.`,
      '',
      ...table(
        ['tenant', 'region', 'result', 'entries', 'first bad seq', 'problem'],
        report.auditChains.results.map((c) => [
          c.tenant,
          c.region,
          c.absent === true ? 'no store' : c.ok ? 'ok' : 'FAILED',
          c.count,
          c.firstBadSeq,
          c.problem ?? c.error,
        ]),
      ),
    );
  }
  out.push(
    '## Audit chain heads (anchors)',
    '',
    "A chain verifies by itself against edits by someone who does not recompute it (an accident, a partial change). Someone with write access to a database can delete or edit events and recompute the whole chain so that it verifies again; what shows that is a head taken earlier and kept out of their reach. Keep this report (or these lines) outside the operator's reach: `cellcds audit verify --anchor <this report's JSON>` (the control plane) and `cellcds audit verify --tenant <id> --anchor <this report's JSON>` fail if the chain no longer holds that hash at that seq.",
    '',
    ...table(
      ['chain', 'anchor (seq:hash)', 'read at'],
      report.anchors.map((a) => [a.chain, `${a.seq}:${a.hash}`, a.at]),
    ),
    '### Audit verifications, exported heads and evidence reports',
    '',
    ...table(EVENT_HEADER, eventRows(report.auditActivity)),
    '## Backups and restore tests',
    '',
    ...table(
      ['tenant', 'last backup', 'last restore'],
      report.backups.map((b) => [
        b.tenant,
        b.lastBackup
          ? `${b.lastBackup.at} (${b.lastBackup.type}, ${b.lastBackup.outcome})`
          : 'none in period',
        b.lastRestore
          ? `${b.lastRestore.at} (${b.lastRestore.type}, ${b.lastRestore.outcome})`
          : 'none in period',
      ]),
    ),
  );
  return `${out.join('\n').trimEnd()}\n`;
}

/**
 * Writes `evidence-<from>_<to>.json` and `.md` into `dir` (created 0700; files 0600).
 * @returns the two file paths.
 */
export function writeEvidence(
  report: EvidenceReport,
  dir: string,
): { json: string; markdown: string } {
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  const stamp = (iso: string) => iso.replace(/[:.]/g, '').replace(/-/g, '');
  const base = path.join(dir, `evidence-${stamp(report.period.from)}_${stamp(report.period.to)}`);
  const json = `${base}.json`;
  const markdown = `${base}.md`;
  fs.writeFileSync(json, `${JSON.stringify(report, null, 2)}\n`, { mode: 0o600 });
  fs.writeFileSync(markdown, renderEvidenceMarkdown(report), { mode: 0o600 });
  return { json, markdown };
}
