package org.qdedup.format;

import java.io.IOException;

/**
 * Bad input found on disk: names the file, the structure, the offset, and what was expected versus found.
 * The message is complete as it stands, so the CLI prints it after {@code "qdedup: "} unchanged.
 */
public class FormatException extends IOException {
    public FormatException(String message) {
        super(printable(message));
    }

    /**
     * The text with control characters (a newline in a backing file name, say) shown as {@code \xNN}, so that a
     * message quoting bytes from an image stays one line.
     */
    public static String printable(String s) {
        if (s == null || s.chars().noneMatch(c -> c < 0x20 || c == 0x7f)) {
            return s;
        }
        StringBuilder b = new StringBuilder(s.length() + 16);
        s.chars().forEach(c -> {
            if (c < 0x20 || c == 0x7f) {
                b.append(String.format("\\x%02x", c));
            } else {
                b.append((char) c);
            }
        });
        return b.toString();
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
