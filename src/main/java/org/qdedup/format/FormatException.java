package org.qdedup.format;

import java.io.IOException;

/**
 * Bad input found on disk: names the file, the structure, the offset, and what was expected versus found.
 * The message is complete as it stands, so the CLI prints it after {@code "qdedup: "} unchanged.
 */
public class FormatException extends IOException {
    public FormatException(String message) {
        super(message);
    }

    /** One-line message "FILE: STRUCTURE at offset N: expected E, found F". */
    public static FormatException at(String file, String structure, long offset, String expected, String found) {
        return new FormatException(file + ": " + structure + " at offset " + offset + ": expected " + expected + ", found " + found);
    }

    /** One-line message "FILE: what". */
    public static FormatException of(String file, String what) {
        return new FormatException(file + ": " + what);
    }
}
