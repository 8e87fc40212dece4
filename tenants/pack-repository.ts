/**
 * The rule-pack catalog. `(id, version)` is immutable once stored: an identical re-upload is
 * 'unchanged', different content under the same version is a ConflictError (HTTP 409).
 */
import semver from 'semver';
import { UniqueConstraintError } from 'sequelize';
import type { Transaction } from 'sequelize';
import type { RulePack } from '../rules/index.ts';
import type { ControlPlaneModels, PackRow, WriteTx } from './control-plane-models.ts';
import { ConflictError, InvalidInputError, NotFoundError } from './errors.ts';
import type { NewStoredPack, PackRepository, PackSummary, StoredPack } from './types.ts';

const HASH_PATTERN = /^[0-9a-f]{64}$/;

function toSummary(row: PackRow): PackSummary {
  return {
    id: row.id,
    version: row.version,
    hash: row.hash,
    uploadedAt: row.uploadedAt,
    ...(row.uploadedBy !== null ? { uploadedBy: row.uploadedBy } : {}),
  };
}

function validate(input: NewStoredPack): void {
  const body = input.pack as unknown;
  if (typeof input.id !== 'string' || input.id.length === 0 || input.id.length > 128) {
    throw new InvalidInputError('id', 'must be a pack id');
  }
  if (typeof input.version !== 'string' || semver.valid(input.version) === null) {
    throw new InvalidInputError('version', 'must be a semver version');
  }
  if (typeof input.hash !== 'string' || !HASH_PATTERN.test(input.hash)) {
    throw new InvalidInputError('hash', 'must be a sha256 hex digest');
  }
  if (
    typeof body !== 'object' ||
    body === null ||
    (body as Partial<RulePack>).id !== input.id ||
    (body as Partial<RulePack>).version !== input.version
  ) {
    throw new InvalidInputError('pack', 'must be the pack named by id and version');
  }
}

/** Creates the pack catalog repository. */
export function createPackRepository(deps: {
  writeTx: WriteTx;
  models: ControlPlaneModels;
  now: () => Date;
}): PackRepository {
  const { writeTx, now } = deps;
  const { Pack } = deps.models;

  async function find(id: string, version: string, t?: Transaction): Promise<PackRow | undefined> {
    const row = await Pack.findOne({
      where: { id, version },
      raw: true,
      ...(t ? { transaction: t } : {}),
    });
    return (row as unknown as PackRow | null) ?? undefined;
  }

  /**
   * The next patch version of `version` that `id` does not have yet, to suggest in the
   * conflict's message (1.2.3 -> 1.2.4, or 1.2.5 when 1.2.4 is stored too).
   */
  async function nextFreePatch(
    id: string,
    version: string,
    t?: Transaction,
  ): Promise<string | undefined> {
    const m = /^(\d+)\.(\d+)\.(\d+)/.exec(version);
    if (!m) {
      return undefined;
    }
    const rows = (await Pack.findAll({
      where: { id },
      attributes: ['version'],
      raw: true,
      ...(t ? { transaction: t } : {}),
    })) as unknown as Array<{ version: string }>;
    const taken = new Set(rows.map((r) => r.version));
    let patch = Number(m[3]) + 1;
    while (taken.has(`${m[1]}.${m[2]}.${patch}`)) {
      patch++;
    }
    return `${m[1]}.${m[2]}.${patch}`;
  }

  async function compare(existing: PackRow, hash: string, t?: Transaction): Promise<'unchanged'> {
    if (existing.hash !== hash) {
      const next = await nextFreePatch(existing.id, existing.version, t);
      throw new ConflictError(
        `${existing.id}@${existing.version} is already stored with different content; versions are immutable: bump "version"${next ? ` (e.g. to ${next})` : ''} and push again`,
      );
    }
    return 'unchanged';
  }

  return {
    async put(input) {
      validate(input);
      const row: PackRow = {
        id: input.id,
        version: input.version,
        hash: input.hash,
        pack: JSON.stringify(input.pack),
        uploadedAt: now().toISOString(),
        uploadedBy: input.uploadedBy ?? null,
      };
      try {
        return await writeTx(async (t) => {
          const existing = await find(input.id, input.version, t);
          if (existing) {
            return compare(existing, input.hash, t);
          }
          await Pack.create(row, { transaction: t });
          return 'created' as const;
        });
      } catch (err) {
        if (err instanceof UniqueConstraintError) {
          const existing = await find(input.id, input.version);
          if (existing) {
            return compare(existing, input.hash);
          }
        }
        throw err;
      }
    },

    async get(id, version) {
      const row =
        typeof id === 'string' && typeof version === 'string' ? await find(id, version) : undefined;
      if (!row) {
        throw new NotFoundError('pack version');
      }
      const stored: StoredPack = { ...toSummary(row), pack: JSON.parse(row.pack) as RulePack };
      return stored;
    },

    async list() {
      const rows = await Pack.findAll({
        attributes: ['id', 'version', 'hash', 'uploadedAt', 'uploadedBy'],
        raw: true,
        order: [
          ['id', 'ASC'],
          ['uploadedAt', 'ASC'],
        ],
      });
      return (rows as unknown as PackRow[]).map(toSummary);
    },

    async versions(id) {
      const rows = await Pack.findAll({ attributes: ['version'], where: { id }, raw: true });
      return (rows as unknown as Array<{ version: string }>)
        .map((r) => r.version)
        .sort(semver.compare);
    },
  };
}
