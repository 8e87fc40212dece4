/**
 * The evidence report an auditor asks for, for a period: the region matrix, where every
 * tenant is placed and under which residency policy, key rotation history, admin access and
 * role changes, failed authentication counts, audit chain verification, and the last backup
 * and restore per tenant. JSON (`buildEvidence`) and a readable page
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
import { describeRegion } from './regions.ts';
import type { Region, RegionDescription, RegionMatrix } from './regions.ts';

export const EVIDENCE_FORMAT = 'cellcds-evidence/1';
/** `audit.list` returns at most this many events; larger ranges are split. */
const AUDIT_PAGE = 10_000;

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
  /** Null when no verifier was given. */
  auditChains: { checked: number; failed: number; absent: number; results: ChainCheck[] } | null;
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
  const sources: string[] = ['control-plane audit log'];
  const tenants = await opts.controlPlane.tenants.list();
  const events: EvidenceEvent[] = (await listAll(opts.controlPlane.audit, from, to, sources)).map(
    (e) => toEvidence(e, 'control-plane'),
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
            events.push(toEvidence({ ...e, tenant: tenant.id }, `tenant:${tenant.id}`));
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
    auditChains,
    backups,
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
    '## Audit chain verification',
    '',
  );
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
