/**
 * Boot failures that name what failed and which setting to check: a refused PostgreSQL
 * connection, an unreadable keyring or an invalid demo pack otherwise surface as one bare driver
 * line (`connect ECONNREFUSED ...`) an operator cannot place. `bootStep` tags a failure with its
 * component and setting; `reportBootFailure` logs it as a fatal JSON line and writes the human
 * line to stderr (docs/operations.md, "When something is wrong").
 */
import { PackValidationError } from '../rules/index.ts';
import { ConfigError } from './config.ts';
import type { Logger } from './logger.ts';

/** Problems of an invalid demo pack printed at boot (the rest are counted). */
const MAX_PROBLEMS = 20;

/** A component failed to start; `message` names it and the setting to check. */
export class BootError extends Error {
  readonly component: string;
  readonly setting: string;
  constructor(component: string, setting: string, cause: unknown) {
    const reason = cause instanceof Error ? cause.message : String(cause);
    super(`${component} failed at boot: ${reason} (check ${setting})`, { cause });
    this.name = new.target.name;
    this.component = component;
    this.setting = setting;
  }
}

/** `err` as a BootError naming `component` and `setting` (ConfigError and BootError as they are). */
export function asBootError(component: string, setting: string, err: unknown): Error {
  if (err instanceof ConfigError || err instanceof BootError) {
    return err;
  }
  return new BootError(component, setting, err);
}

/**
 * Runs one boot step; a failure becomes a BootError naming `component` and `setting`. A
 * ConfigError (already naming its setting) and a BootError pass through unchanged.
 */
export async function bootStep<T>(
  component: string,
  setting: string,
  step: () => Promise<T>,
): Promise<T> {
  try {
    return await step();
  } catch (err) {
    throw asBootError(component, setting, err);
  }
}

/** The lines describing a demo pack's problems: the first 20, then how many more. */
export function packProblems(err: PackValidationError): string[] {
  const lines = err.problems
    .slice(0, MAX_PROBLEMS)
    .map((p) => `${p.path ? `${p.path}: ` : ''}${p.message}`);
  if (err.total > lines.length) {
    lines.push(`... and ${String(err.total - lines.length)} more`);
  }
  return lines;
}

/**
 * Logs a boot failure at fatal level (component, setting, the error) and writes the line for
 * humans to stderr: `cellcds: <component> failed at boot: <reason> (check <setting>)`, then a
 * demo pack's problems. The caller keeps its exit code.
 */
export function reportBootFailure(log: Logger, err: unknown): void {
  const component = err instanceof BootError ? err.component : 'startup';
  const setting = err instanceof BootError ? err.setting : undefined;
  const cause = err instanceof BootError ? err.cause : err;
  const problems = cause instanceof PackValidationError ? packProblems(cause) : [];
  log.fatal(
    {
      component,
      ...(setting !== undefined ? { setting } : {}),
      err: cause,
      ...(problems.length > 0 ? { problems } : {}),
    },
    'boot failed',
  );
  const message = err instanceof Error ? err.message : String(err);
  process.stderr.write(`cellcds: ${message}\n${problems.map((l) => `  - ${l}\n`).join('')}`);
}
