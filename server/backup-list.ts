/**
 * `cellcds backup list`: the backups in a region's backup folder, read from their manifests
 * (tenant, region, time, counts, file sizes), their shape checked as restore checks it
 * (`readManifestShape`). Read-only and local: it opens no store and no key, and it does not
 * verify a backup (checksums, MAC, snapshot): restore does that. A folder with
 * no `manifest.json` (a migration's checkpoints) is not a backup and is left out; one whose
 * manifest cannot be read is reported as a problem.
 */
import fs from 'node:fs';
import path from 'node:path';
import { BackupError, isFormat1, readManifestShape } from '../tenants/index.ts';
import type { BackupManifest } from '../tenants/index.ts';
import { textTable } from './text-table.ts';

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

/** The summary of one manifest, as restore reads its shape (its files are not checked). */
function summarize(name: string, m: BackupManifest): BackupSummary {
  return {
    name,
    tenant: m.tenant,
    region: m.region,
    createdAt: m.createdAt,
    format: isFormat1(m) ? 1 : 2,
    authenticated: !isFormat1(m) && 'mac' in m && m.mac !== undefined,
    bytes: m.files.reduce((sum, f) => sum + f.bytes, 0),
    counts: { ...m.counts },
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
    const folder = path.join(backupDir, entry.name);
    if (!fs.existsSync(path.join(folder, 'manifest.json'))) {
      continue; // no manifest: not a backup (e.g. `migrations/`)
    }
    let m: BackupManifest;
    try {
      m = readManifestShape(folder);
    } catch (err) {
      if (!(err instanceof BackupError)) {
        throw err;
      }
      problems.push({ name: entry.name, problem: err.message });
      continue;
    }
    if (opts.tenant === undefined || m.tenant === opts.tenant) {
      backups.push(summarize(entry.name, m));
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
  return textTable(['NAME', 'TENANT', 'CREATED', 'SIZE', 'RECORDS'], rows).join('\n');
}
