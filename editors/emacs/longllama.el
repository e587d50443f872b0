;;; longllama.el --- LongLLaMA repository-aware completion via eglot or lsp-mode -*- lexical-binding: t -*-

;; Version: 0.1.0
;; Package-Requires: ((emacs "28.1") (eglot "1.9"))
;; Keywords: tools, languages, completion

;;; Commentary:

;; Starts `longllama-lsp' (stdio), passes `longllama-settings' as initializationOptions and maps
;; keys; all logic lives in the server.  Messages: longllama_lsp/protocol.py; docs: editors/README.md.
;;
;;   (require 'longllama)
;;   (longllama-eglot-setup)              ; longllama-lsp serves `longllama-modes' in eglot
;;   (add-hook 'eglot-managed-mode-hook #'longllama-inline-mode)
;;
;; The completion menu comes from eglot's own `completion-at-point' (textDocument/completion).
;; Eglot has no inline completion, so `longllama-inline-mode' asks textDocument/inlineCompletion
;; itself when Emacs is idle and shows the answer as ghost text: TAB accepts, any other key drops it.
;; lsp-mode users get the client registered as an add-on (`lsp-inline-completion-mode' shows ghost text).

;;; Code:

(require 'eglot)
(require 'jsonrpc)
(require 'cl-lib)

(defgroup longllama nil "Repository-aware completion with LongLLaMA." :group 'tools)

(defcustom longllama-server-command '("longllama-lsp")
  "Command line that starts the language server (stdio)."
  :type '(repeat string))

(defcustom longllama-settings nil
  "The server's settings tree, a plist sent as initializationOptions.
For example (:completion (:maxTokens 64) :model (:path \"~/m\")).
Every setting is in editors/README.md.  Use :json-false for false."
  :type 'plist)

(defcustom longllama-modes '(python-mode js-mode typescript-mode go-mode rust-mode java-mode c-mode c++-mode)
  "Major modes served by longllama-lsp."
  :type '(repeat symbol))

(defcustom longllama-idle-delay 0.3
  "Seconds of idleness before `longllama-inline-mode' asks for a completion."
  :type 'number)

(defface longllama-ghost '((t :inherit shadow)) "Face of the ghost text.")

;;;; Server registration

(defclass longllama-eglot-server (eglot-lsp-server) () :documentation "An eglot client of longllama-lsp.")

(cl-defmethod eglot-initialization-options ((_server longllama-eglot-server))
  longllama-settings)

(defun longllama--contact (&optional _interactive)
  (cons 'longllama-eglot-server longllama-server-command))

;;;###autoload
(defun longllama-eglot-setup ()
  "Make longllama-lsp the eglot server for `longllama-modes'.
Eglot runs one server per major mode: this one replaces the others."
  (add-to-list 'eglot-server-programs (cons longllama-modes #'longllama--contact)))

(declare-function lsp-register-client "ext:lsp-mode")
(declare-function make-lsp-client "ext:lsp-mode")
(declare-function lsp-stdio-connection "ext:lsp-mode")
(declare-function lsp-request "ext:lsp-mode")
(with-eval-after-load 'lsp-mode
  (lsp-register-client
   (make-lsp-client :new-connection (lsp-stdio-connection (lambda () longllama-server-command))
                    :activation-fn (lambda (&rest _) (apply #'derived-mode-p longllama-modes))
                    :initialization-options (lambda () longllama-settings)
                    :add-on? t :server-id 'longllama)))

;;;; Requests

(defun longllama--request (method params)
  "Send METHOD with PARAMS to the buffer's server (eglot, else lsp-mode); wait."
  (cond ((eglot-managed-p)
         (eglot--signal-textDocument/didChange) ; eglot batches edits: flush them first
         (jsonrpc-request (eglot--current-server-or-lose) method params :cancel-on-input non-essential))
        ((bound-and-true-p lsp-mode) (lsp-request (substring (symbol-name method) 1) params))
        (t (user-error "longllama: this buffer has no language server"))))

(defun longllama--get (object key)
  "KEY (a keyword) of a JSON OBJECT: a plist, or lsp-mode's hash table."
  (if (hash-table-p object) (gethash (substring (symbol-name key) 1) object) (plist-get object key)))

;;;; Inline completion (ghost text)

(defvar-local longllama--overlay nil "The ghost text overlay.")
(defvar-local longllama--item nil "The shown item: (START END TEXT).")
(defvar-local longllama--timer nil)

(defun longllama-clear ()
  "Remove the ghost text."
  (when longllama--overlay (delete-overlay longllama--overlay))
  (setq longllama--overlay nil longllama--item nil))

(defvar longllama-ghost-map
  (let ((map (make-sparse-keymap)))
    (define-key map (kbd "TAB") #'longllama-accept)
    (define-key map (kbd "<tab>") #'longllama-accept)
    map)
  "Active while ghost text is shown.")

(defun longllama--show (result)
  "Show the first item of an inline completion RESULT at point."
  (let* ((items (if (vectorp result) result (longllama--get result :items)))
         (item (and (> (length items) 0) (aref items 0)))
         (text (and item (longllama--get item :insertText)))
         (range (and item (longllama--get item :range)))
         (region (if range (eglot--range-region range) (cons (point) (point))))
         (typed (buffer-substring-no-properties (car region) (point))))
    (longllama-clear)
    (when (and (stringp text) (string-prefix-p typed text) (> (length text) (length typed)))
      (let ((ghost (substring text (length typed))))
        (put-text-property 0 1 'cursor t ghost)
        (setq longllama--item (list (car region) (max (cdr region) (point)) text)
              longllama--overlay (make-overlay (point) (point) nil t))
        (overlay-put longllama--overlay 'after-string (propertize ghost 'face 'longllama-ghost))
        (set-transient-map longllama-ghost-map nil #'longllama-clear)
        ghost))))

(defun longllama-complete (&optional automatic)
  "Show the server's inline completion at point as ghost text; return it.
AUTOMATIC non-nil means Emacs asked on its own (the user is typing)."
  (interactive)
  (when (eglot-managed-p)
    (longllama--show (longllama--request :textDocument/inlineCompletion
                                         (append (eglot--TextDocumentPositionParams)
                                                 `(:context (:triggerKind ,(if automatic 2 1))))))))

(defun longllama-accept ()
  "Insert the ghost text."
  (interactive)
  (pcase longllama--item
    (`(,start ,end ,text) (longllama-clear) (delete-region start end) (goto-char start) (insert text))))

(defun longllama--idle (buffer)
  (when (and (eq buffer (current-buffer)) (not (minibufferp)) (not longllama--overlay))
    (let ((non-essential t))
      (with-demoted-errors "longllama: %S" (longllama-complete t)))))

;;;###autoload
(define-minor-mode longllama-inline-mode
  "Ghost-text completions from longllama-lsp while you type (TAB accepts)."
  :lighter " LL"
  (when longllama--timer (cancel-timer longllama--timer))
  (setq longllama--timer (and longllama-inline-mode
                              (run-with-idle-timer longllama-idle-delay t #'longllama--idle (current-buffer))))
  (unless longllama-inline-mode (longllama-clear)))

;;;; Commands

(defun longllama--insert-source (source)
  (let ((uri (longllama--get source :uri)) (line (longllama--get source :startLine)))
    (insert "- ")
    (insert-text-button (format "%s:%d-%d" (longllama--get source :path) line (longllama--get source :endLine))
                        'action (lambda (_) (find-file (eglot--uri-to-path uri)) (goto-char (point-min))
                                  (forward-line (1- line)))
                        'follow-link t)
    (insert (format "  %s(%.1f%%)\n" (or (longllama--get source :symbol) "")
                    (* 100 (longllama--get source :weight))))))

(defun longllama-ask (question)
  "Ask the server QUESTION about the repository.
The answer and buttons to its sources show in *longllama-answer*."
  (interactive "sAsk LongLLaMA: ")
  (let* ((params `(:question ,question ,@(and buffer-file-name `(:textDocument ,(eglot--TextDocumentIdentifier)))))
         (result (longllama--request :longllama/ask params))
         (sources (longllama--get result :sources)))
    (with-current-buffer (get-buffer-create "*longllama-answer*")
      (let ((inhibit-read-only t))
        (erase-buffer)
        (insert (format "Q: %s\n\n%s\n" question (longllama--get result :answer)))
        (when (> (length sources) 0)
          (insert "\nSources:\n")
          (mapc #'longllama--insert-source sources))
        (goto-char (point-min)))
      (special-mode)
      (display-buffer (current-buffer))
      result)))

(defun longllama-reindex ()
  "Reindex the workspace folders."
  (interactive)
  (let ((result (longllama--request :workspace/executeCommand '(:command "longllama.reindex" :arguments []))))
    (message "longllama: %s" (if (eq (longllama--get result :started) t)
                                 (format "reindexing %s" (longllama--get result :roots))
                               "not reindexing (indexing is off or the model is not loaded)"))))

(defun longllama-status ()
  "Show the server's status."
  (interactive)
  (let ((s (longllama--request :longllama/status nil)))
    (message "longllama: %s on %s; indexing %s: %s files, %s chunks" (longllama--get s :engine)
             (longllama--get s :device) (longllama--get s :indexing) (longllama--get s :files)
             (longllama--get s :chunks))))

(defun longllama-update-settings (settings)
  "Set `longllama-settings' to SETTINGS and send them to the running eglot server."
  (setq longllama-settings settings)
  (jsonrpc-notify (eglot--current-server-or-lose) :workspace/didChangeConfiguration
                  `(:settings (:longllama ,settings))))

(provide 'longllama)
;;; longllama.el ends here
