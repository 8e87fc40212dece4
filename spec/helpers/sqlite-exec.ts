/**
 * Runs statements on a SQLite file over a connection of its own (as another process would),
 * for specs that must write a row the service's API never writes (an expired token, an old
 * table layout).
 */
import sqlite3 from 'sqlite3';

export async function sqliteExec(
  file: string,
  statements: Array<string | [string, unknown[]]>,
): Promise<void> {
  const db = new sqlite3.Database(file);
  try {
    for (const statement of statements) {
      const [sql, params] = typeof statement === 'string' ? [statement, []] : statement;
      await new Promise<void>((resolve, reject) => {
        db.run(sql, params, (err) => {
          if (err) {
            reject(err);
          } else {
            resolve();
          }
        });
      });
    }
  } finally {
    await new Promise<void>((resolve) => {
      db.close(() => {
        resolve();
      });
    });
  }
}
