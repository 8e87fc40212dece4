/**
 * The region matrix: which regions exist, under which jurisdiction, where each one hosts its
 * data, keeps its backups and holds its keys, and where it may fail over to. Read once at boot
 * from `CELLCDS_REGIONS_FILE` (YAML or JSON) and validated; every problem names its path
 * (`regions[1].failover[0]: unknown region 'ap-south'`). Without a file there is one embedded
 * region, `local`, under the data directory.
 */
import fs from 'node:fs';
import path from 'node:path';
import YAML from 'yaml';
import { z } from 'zod';
import { ConfigError } from './config.ts';
import { textTable } from './text-table.ts';

const REGION_ID = /^[a-z0-9][a-z0-9-]{0,31}$/;
const JURISDICTION = /^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$/;
const MAX_REGIONS = 64;

/** Where a region's tenant stores live. */
export type RegionStorage =
  /** SQLite: tenant stores at `<dataDir>/<region id>/<tenant>.sqlite` (absolute path). */
  | { kind: 'sqlite'; dataDir: string }
  /** PostgreSQL: one schema per tenant. The URL may carry credentials: never print it raw. */
  | { kind: 'postgres'; postgresUrl: string };

/**
 * Where a region's master keys (KEKs) are held. A discriminated union on `kind`: an HSM or KMS
 * provider is added as another member (e.g. `{ kind: 'aws-kms'; keyArn }`) without changing
 * callers that switch on `kind`.
 */
export type KeyProviderConfig = {
  kind: 'local-keyring';
  /** Folder of the keyring files (`<dir>/<region>.keyring.json`), absolute. */
  dir: string;
};

/** One region of the matrix. Structurally a tenants/ `RegionInfo` (id, jurisdiction, failover). */
export interface Region {
  readonly id: string;
  /** Jurisdiction label, e.g. `US`, `EU`; the DR rule `jurisdiction` compares these exactly. */
  readonly jurisdiction: string;
  /** Base URL of this region's plane: `aud` of client tokens is checked against it. */
  readonly publicUrl: string;
  readonly storage: RegionStorage;
  /** Folder where this region writes tenant backups (absolute). */
  readonly backupDir: string;
  readonly keyProvider: KeyProviderConfig;
  /** Regions this region's tenants may fail over to (if their DR rule allows it too). */
  readonly failover: readonly string[];
}

export interface RegionMatrix {
  /** The file it was read from, or `embedded`. */
  readonly source: string;
  readonly regions: readonly Region[];
}

/** What the embedded default needs (from Config). */
export interface RegionDefaults {
  /** CELLCDS_DATA_DIR (absolute). */
  dataDir: string;
  /** CELLCDS_PUBLIC_URL. */
  publicUrl: string;
}

/** One problem of a regions file; `path` is a JSON path (`regions[1].failover[0]`). */
export interface RegionProblem {
  path: string;
  message: string;
}

/** The regions file is unreadable or invalid. The message names the file and each path. */
export class RegionConfigError extends ConfigError {
  readonly problems: readonly RegionProblem[];
  constructor(source: string, problems: readonly RegionProblem[]) {
    super(
      `regions file ${source}: ${problems.map((p) => (p.path ? `${p.path}: ${p.message}` : p.message)).join('; ')}`,
    );
    this.problems = problems;
  }
}

function isHttpUrl(value: string): boolean {
  try {
    const url = new URL(value);
    return (
      (url.protocol === 'https:' || url.protocol === 'http:') &&
      !url.search &&
      !url.hash &&
      !url.username &&
      !url.password
    );
  } catch {
    return false;
  }
}

function isPostgresUrl(value: string): boolean {
  try {
    const url = new URL(value);
    return url.protocol === 'postgres:' || url.protocol === 'postgresql:';
  } catch {
    return false;
  }
}

const nonEmpty = z.string().min(1, 'must be a non-empty string').max(4096);

const RegionSchema = z.strictObject({
  id: z.string().regex(REGION_ID, 'must be a lower-case region id such as us-east'),
  jurisdiction: z.string().regex(JURISDICTION, 'must be a jurisdiction label such as US or EU'),
  publicUrl: z
    .string()
    .refine(isHttpUrl, 'must be an absolute http(s) URL without query, fragment or credentials'),
  storage: z
    .strictObject({
      dataDir: nonEmpty.optional(),
      postgresUrl: z
        .string()
        .refine(isPostgresUrl, 'must be a postgres:// or postgresql:// URL')
        .optional(),
    })
    .refine((s) => (s.dataDir === undefined) !== (s.postgresUrl === undefined), {
      error: 'must have exactly one of dataDir and postgresUrl',
    }),
  backupDir: nonEmpty,
  keyProvider: z.discriminatedUnion(
    'kind',
    [z.strictObject({ kind: z.literal('local-keyring'), dir: nonEmpty })],
    { error: "must be { kind: 'local-keyring', dir }" },
  ),
  failover: z
    .array(z.string().regex(REGION_ID, 'must be a region id'))
    .max(MAX_REGIONS)
    .default([]),
});

const FileSchema = z.strictObject({
  regions: z
    .array(RegionSchema)
    .min(1, 'must define at least one region')
    .max(MAX_REGIONS, `must define at most ${MAX_REGIONS} regions`),
});

/** `['regions', 1, 'failover', 0]` -> `regions[1].failover[0]`. */
function formatPath(parts: readonly PropertyKey[]): string {
  let out = '';
  for (const part of parts) {
    if (typeof part === 'number') {
      out += `[${part}]`;
    } else {
      out += out ? `.${String(part)}` : String(part);
    }
  }
  return out;
}

function zodProblems(error: z.ZodError): RegionProblem[] {
  return error.issues.flatMap((issue): RegionProblem[] => {
    const base = formatPath(issue.path);
    if (issue.code === 'unrecognized_keys') {
      return issue.keys.map((k) => ({
        path: formatPath([...issue.path, k.slice(0, 64)]),
        message: 'is not a known field',
      }));
    }
    if (issue.code === 'invalid_type' && base === '') {
      return [{ path: '', message: 'must be a mapping with a `regions` list' }];
    }
    if (issue.code === 'invalid_type' && issue.input === undefined) {
      return [{ path: base, message: 'is required' }];
    }
    if (issue.code === 'invalid_type') {
      return [
        {
          path: base,
          message: `must be ${issue.expected === 'object' ? 'a mapping' : `a ${issue.expected}`}`,
        },
      ];
    }
    return [{ path: base, message: issue.message }];
  });
}

/** Cross-region rules zod cannot express: unique ids, URLs, backup folders; failover targets. */
function matrixProblems(regions: readonly z.infer<typeof RegionSchema>[]): RegionProblem[] {
  const problems: RegionProblem[] = [];
  const ids = new Set(regions.map((r) => r.id));
  const seen = new Map<string, string>();
  const firstOwner = (kind: string, value: string, id: string): string | undefined => {
    const key = `${kind}\u0000${value}`;
    const owner = seen.get(key);
    if (owner === undefined) {
      seen.set(key, id);
    }
    return owner;
  };
  regions.forEach((r, i) => {
    const idOwner = firstOwner('id', r.id, r.id);
    if (idOwner !== undefined) {
      problems.push({ path: `regions[${i}].id`, message: `region '${r.id}' is defined twice` });
    }
    const urlOwner = firstOwner('url', r.publicUrl.replace(/\/+$/, ''), r.id);
    if (urlOwner !== undefined && idOwner === undefined) {
      problems.push({
        path: `regions[${i}].publicUrl`,
        message: `is also the public URL of region '${urlOwner}'`,
      });
    }
    const backupOwner = firstOwner('backup', r.backupDir, r.id);
    if (backupOwner !== undefined && idOwner === undefined) {
      problems.push({
        path: `regions[${i}].backupDir`,
        message: `is also the backup location of region '${backupOwner}'`,
      });
    }
    if (r.storage.postgresUrl !== undefined) {
      const pgOwner = firstOwner('pg', r.storage.postgresUrl, r.id);
      if (pgOwner !== undefined && idOwner === undefined) {
        problems.push({
          path: `regions[${i}].storage.postgresUrl`,
          message: `is also the database of region '${pgOwner}'`,
        });
      }
    }
    const targets = new Set<string>();
    r.failover.forEach((target, j) => {
      const p = `regions[${i}].failover[${j}]`;
      if (!ids.has(target)) {
        problems.push({ path: p, message: `unknown region '${target}'` });
      } else if (target === r.id) {
        problems.push({ path: p, message: 'a region cannot fail over to itself' });
      } else if (targets.has(target)) {
        problems.push({ path: p, message: `'${target}' is listed twice` });
      }
      targets.add(target);
    });
  });
  return problems;
}

function freezeRegion(r: Region): Region {
  return Object.freeze({
    ...r,
    storage: Object.freeze({ ...r.storage }),
    keyProvider: Object.freeze({ ...r.keyProvider }),
    failover: Object.freeze([...r.failover]),
  });
}

/**
 * Validates a parsed regions document. Relative paths resolve against `baseDir`.
 * @throws RegionConfigError listing every problem with its path.
 */
export function parseRegionMatrix(raw: unknown, source: string, baseDir: string): RegionMatrix {
  // `reportInput` only so that a missing field reads "is required"; inputs are not printed.
  const parsed = FileSchema.safeParse(raw, { reportInput: true });
  if (!parsed.success) {
    throw new RegionConfigError(source, zodProblems(parsed.error));
  }
  const problems = matrixProblems(parsed.data.regions);
  if (problems.length > 0) {
    throw new RegionConfigError(source, problems);
  }
  const abs = (p: string) => path.resolve(baseDir, p);
  const regions = parsed.data.regions.map((r) =>
    freezeRegion({
      id: r.id,
      jurisdiction: r.jurisdiction,
      publicUrl: r.publicUrl.replace(/\/+$/, ''),
      storage:
        r.storage.dataDir !== undefined
          ? { kind: 'sqlite', dataDir: abs(r.storage.dataDir) }
          : { kind: 'postgres', postgresUrl: r.storage.postgresUrl ?? '' },
      backupDir: abs(r.backupDir),
      keyProvider: { kind: r.keyProvider.kind, dir: abs(r.keyProvider.dir) },
      failover: r.failover,
    }),
  );
  return Object.freeze({ source, regions: Object.freeze(regions) });
}

/** The matrix without a regions file: one region `local` under the data directory. */
export function embeddedRegionMatrix(defaults: RegionDefaults): RegionMatrix {
  const dataDir = path.resolve(defaults.dataDir);
  return Object.freeze({
    source: 'embedded',
    regions: Object.freeze([
      freezeRegion({
        id: 'local',
        jurisdiction: 'local',
        publicUrl: defaults.publicUrl.replace(/\/+$/, ''),
        storage: { kind: 'sqlite', dataDir },
        backupDir: path.join(dataDir, 'backups', 'local'),
        keyProvider: { kind: 'local-keyring', dir: path.join(dataDir, 'keys') },
        failover: [],
      }),
    ]),
  });
}

/**
 * Loads the region matrix: from `file` (YAML, or JSON for `.json`) when given, else the
 * embedded single region `local` (stores in `<dataDir>/local/`).
 * @throws RegionConfigError naming the file and every path that is wrong.
 */
export function loadRegionMatrix(file: string | undefined, defaults: RegionDefaults): RegionMatrix {
  if (file === undefined) {
    return embeddedRegionMatrix(defaults);
  }
  const source = path.resolve(file);
  let text: string;
  try {
    text = fs.readFileSync(source, 'utf8');
  } catch (err) {
    const code = (err as { code?: unknown }).code;
    throw new RegionConfigError(source, [
      { path: '', message: `cannot be read (${typeof code === 'string' ? code : 'error'})` },
    ]);
  }
  let raw: unknown;
  try {
    raw = source.endsWith('.json') ? JSON.parse(text) : YAML.parse(text, { maxAliasCount: 100 });
  } catch (err) {
    const detail = err instanceof Error ? err.message.split('\n')[0] : 'parse error';
    throw new RegionConfigError(source, [
      {
        path: '',
        message: `is not valid ${source.endsWith('.json') ? 'JSON' : 'YAML'}: ${detail}`,
      },
    ]);
  }
  return parseRegionMatrix(raw, source, path.dirname(source));
}

/**
 * The region `id` of the matrix (the one this process serves).
 * @throws RegionConfigError when the matrix does not define it.
 */
export function selectRegion(matrix: RegionMatrix, id: string): Region {
  const region = matrix.regions.find((r) => r.id === id);
  if (!region) {
    throw new RegionConfigError(matrix.source, [
      {
        path: '',
        message: `defines no region '${id}' (CELLCDS_REGION / --region); it defines ${matrix.regions.map((r) => r.id).join(', ')}`,
      },
    ]);
  }
  return region;
}

/** A PostgreSQL URL without credentials or query (for tables, logs and reports). */
export function redactPostgresUrl(raw: string): string {
  try {
    const url = new URL(raw);
    const auth = url.username || url.password ? '***@' : '';
    return `${url.protocol}//${auth}${url.host}${url.pathname}`;
  } catch {
    return '[invalid url]';
  }
}

/** A region as a printable, secret-free row (used by `formatRegionTable` and evidence). */
export interface RegionDescription {
  id: string;
  jurisdiction: string;
  publicUrl: string;
  /** Where tenant data is hosted. */
  data: string;
  /** Where backups live. */
  backups: string;
  /** Where keys are held. */
  keys: string;
  failover: string[];
}

/** Describes a region without secrets (PostgreSQL credentials are masked). */
export function describeRegion(region: Region): RegionDescription {
  const data =
    region.storage.kind === 'sqlite'
      ? `sqlite ${path.join(region.storage.dataDir, region.id)}${path.sep}`
      : `postgres ${redactPostgresUrl(region.storage.postgresUrl)}`;
  return {
    id: region.id,
    jurisdiction: region.jurisdiction,
    publicUrl: region.publicUrl,
    data,
    backups: region.backupDir,
    keys: `${region.keyProvider.kind} ${region.keyProvider.dir}`,
    failover: [...region.failover],
  };
}

/** `cellcds regions`: the matrix as an aligned text table (no secrets). */
export function formatRegionTable(matrix: RegionMatrix): string {
  const header = [
    'REGION',
    'JURISDICTION',
    'DATA HOSTED AT',
    'BACKUPS AT',
    'KEYS HELD IN',
    'FAILOVER TO',
  ];
  const rows = matrix.regions.map((r) => {
    const d = describeRegion(r);
    return [d.id, d.jurisdiction, d.data, d.backups, d.keys, d.failover.join(', ') || '-'];
  });
  return [`Region matrix (${matrix.source}):`, ...textTable(header, rows)].join('\n');
}
