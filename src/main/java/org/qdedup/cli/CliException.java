package org.qdedup.cli;

/** A user-facing error with a complete one-line message and an exit code. */
final class CliException extends RuntimeException {
    final int exitCode;

    CliException(String message) {
        this(message, 1);
    }

    CliException(String message, int exitCode) {
        super(message);
        this.exitCode = exitCode;
    }
}
