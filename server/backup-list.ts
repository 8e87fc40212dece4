/**
 * `cellcds backup list`: the backups in a region's backup folder, read from their manifests
 * (tenant, region, time, counts, file sizes). Read-only and local: it opens no store and no key,
 * and it does not verify a backup (checksums, MAC, snapshot): restore does that. A folder with
 * no `manifest.json` (a migration's checkpoints) is not a backup and is left out; one whose
 * manifest cannot be read is reported as a problem.
 */
import fs from 'node:fs';
import path from 'node:path';

/** One backup, as its manifest describes it. */
export interface BackupSummary {
  /** The folder's name: what `cellcds restore` takes. */
  name: string;
  tenant: string;
  region: string;
  createdAt: string;
  /** The manifest format: 1 was written before backups were authenticated (no MAC). */
  format: 1 | 2;
  /**
   * Whether the manifest carries a MAC (format 2; not checked here). One without restores only
   * with `--allow-unauthenticated`.
   */
  authenticated: boolean;
  /** The backup's size: the files its manifest lists. */
  bytes: number;
  counts: { invocations: number; feedback: number; auditEvents: number };
}

/** A folder that has a manifest.json this listing cannot read. */
export interface BackupListProblem {
  name: string;
  problem: string;
}

/** As restore reads it (tenants/data-plane/backup.ts): a manifest is small. */
const MAX_MANIFEST_BYTES = 1024 * 1024;
const FORMATS: Readonly<Record<string, 1 | 2>> = {
  'cellcds-tenant-backup/1': 1,
  'cellcds-tenant-backup/2': 2,
};

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

const count = (value: unknown): number | undefined =>
  typeof value === 'number' && Number.isSafeInteger(value) && value >= 0 ? value : undefined;

/** The summary of one manifest, or what is wrong with it. */
function summarize(name: string, raw: unknown): BackupSummary | string {
  if (!isRecord(raw)) {
    return 'manifest.json is not a JSON object';
  }
  const format = raw.format;
  if (typeof format !== 'string' || !Object.hasOwn(FORMATS, format)) {
    return 'manifest.json names no backup format this release knows';
  }
  const { tenant, region, createdAt, files, counts } = raw;
  if (
    typeof tenant !== 'string' ||
    typeof region !== 'string' ||
    typeof createdAt !== 'string' ||
    Number.isNaN(Date.parse(createdAt))
  ) {
    return 'manifest.json has no tenant, region or creation time';
  }
  const sizes = Array.isArray(files)
    ? files.map((f) => (isRecord(f) ? count(f.bytes) : undefined))
    : [];
  const c = isRecord(counts)
    ? {
        invocations: count(counts.invocations),
        feedback: count(counts.feedback),
        auditEvents: count(counts.auditEvents),
      }
    : undefined;
  if (
    sizes.length === 0 ||
    sizes.some((s) => s === undefined) ||
    c?.invocations === undefined ||
    c.feedback === undefined ||
    c.auditEvents === undefined
  ) {
    return 'manifest.json has no file sizes or record counts';
  }
  return {
    name,
    tenant,
    region,
    createdAt,
    format: FORMATS[format] === 2 ? 2 : 1,
    authenticated: FORMATS[format] === 2 && typeof raw.mac === 'string',
    bytes: sizes.reduce<number>((a, b) => a + (b ?? 0), 0),
    counts: { invocations: c.invocations, feedback: c.feedback, auditEvents: c.auditEvents },
  };
}

/**
 * The backups in `backupDir` (of `tenant`, if given), newest first (then by name). A missing
 * folder has none. Symbolic links are not followed (restore takes folders inside the folder).
 */
export function listBackups(
  backupDir: string,
  opts: { tenant?: string } = {},
): { backups: BackupSummary[]; problems: BackupListProblem[] } {
  let entries: fs.Dirent[];
  try {
    entries = fs.readdirSync(backupDir, { withFileTypes: true });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
      return { backups: [], problems: [] };
    }
    throw err;
  }
  const backups: BackupSummary[] = [];
  const problems: BackupListProblem[] = [];
  for (const entry of entries) {
    if (!entry.isDirectory()) {
      continue;
    }
    const manifest = path.join(backupDir, entry.name, 'manifest.json');
    let raw: unknown;
    try {
      const st = fs.lstatSync(manifest);
      if (!st.isFile() || st.size > MAX_MANIFEST_BYTES) {
        problems.push({ name: entry.name, problem: 'manifest.json is not a small file' });
        continue;
      }
      raw = JSON.parse(fs.readFileSync(manifest, 'utf8'));
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') {
        continue; // no manifest: not a backup (e.g. `migrations/`)
      }
      problems.push({ name: entry.name, problem: 'manifest.json is unreadable or not JSON' });
      continue;
    }
    const summary = summarize(entry.name, raw);
    if (typeof summary === 'string') {
      problems.push({ name: entry.name, problem: summary });
    } else if (opts.tenant === undefined || summary.tenant === opts.tenant) {
      backups.push(summary);
    }
  }
  backups.sort(
    (a, b) =>
      Date.parse(b.createdAt) - Date.parse(a.createdAt) ||
      (a.name < b.name ? -1 : a.name > b.name ? 1 : 0),
  );
  return { backups, problems };
}

/** `1536` -> `1.5 KiB`. */
export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${String(value)} B` : `${value.toFixed(1)} ${units[unit] ?? ''}`;
}

/** The backups as a table (a header, then one line each), for `cellcds backup list`. */
export function formatBackupTable(backups: readonly BackupSummary[]): string {
  const rows = backups.map((b) => [
    b.name,
    b.tenant,
    b.createdAt,
    formatBytes(b.bytes),
    `${String(b.counts.invocations)} invocations, ${String(b.counts.feedback)} feedback, ${String(b.counts.auditEvents)} audit events` +
      (b.authenticated
        ? ''
        : `  (${b.format === 1 ? 'format 1' : 'no MAC'}: restore needs --allow-unauthenticated)`),
  ]);
  const header = ['NAME', 'TENANT', 'CREATED', 'SIZE', 'RECORDS'];
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]?.length ?? 0)));
  return [header, ...rows]
    .map((r) =>
      r
        .map((cell, i) => (i === r.length - 1 ? cell : cell.padEnd(widths[i] ?? 0)))
        .join('  ')
        .trimEnd(),
    )
    .join('\n');
}
